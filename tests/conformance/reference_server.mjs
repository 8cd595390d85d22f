// Starts the upstream reference server (@durable-streams/server, in memory) as a
// benchmark peer for self-checks of the harnesses. It is run from the Node cache
// folder, where tests/conformance_run.py copies it next to node_modules.
//
// usage: node reference_server.mjs PORT [LONG_POLL_TIMEOUT_MS]
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2])
const longPollTimeout = Number(process.argv[3] ?? 500)
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node reference_server.mjs PORT [LONG_POLL_TIMEOUT_MS]")
  process.exit(2)
}

const server = new DurableStreamTestServer({ host: "127.0.0.1", port, longPollTimeout })
await server.start()
console.log(`reference server listening on ${server.url}`)

let stopping = false
const shutdown = async (signal) => {
  if (stopping) return
  stopping = true
  console.log(`reference server stopping on ${signal}`)
  // An open SSE response can keep stop() waiting; do not hang the caller.
  const forced = setTimeout(() => process.exit(0), 2000)
  forced.unref()
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", () => shutdown("SIGTERM"))
process.on("SIGINT", () => shutdown("SIGINT"))
