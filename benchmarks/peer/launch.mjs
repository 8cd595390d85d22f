// Starts the reference Durable Streams server (file-backed store) for the benchmark harness.
// Usage: node launch.mjs --modules DIR --port N --data-dir DIR [--long-poll-ms MS]
// DIR given to --modules is the folder whose node_modules holds @durable-streams/server.
import { createRequire } from "node:module"
import path from "node:path"
import { parseArgs } from "node:util"

const { values } = parseArgs({
  options: {
    modules: { type: "string" },
    port: { type: "string" },
    "data-dir": { type: "string" },
    "long-poll-ms": { type: "string", default: "2000" },
  },
})
if (!values.modules || !values.port || !values["data-dir"]) {
  console.error("usage: launch.mjs --modules DIR --port N --data-dir DIR [--long-poll-ms MS]")
  process.exit(2)
}

// The package lives in a cache folder, not beside this script, so resolve it from there.
const require = createRequire(path.join(path.resolve(values.modules), "package.json"))
const { DurableStreamTestServer } = require("@durable-streams/server")

// Passing dataDir is what selects FileBackedStreamStore (log files + LMDB) instead of memory.
const server = new DurableStreamTestServer({
  host: "127.0.0.1",
  port: Number(values.port),
  dataDir: path.resolve(values["data-dir"]),
  longPollTimeout: Number(values["long-poll-ms"]),
})

const url = await server.start()
console.log(`reference server listening on ${url} (file-backed, ${values["data-dir"]})`)

let stopping = false
async function shutdown() {
  if (stopping) return
  stopping = true
  // An open SSE reader must not keep the process alive past the harness's patience.
  setTimeout(() => process.exit(0), 3000).unref()
  try {
    await server.stop()
  } finally {
    process.exit(0)
  }
}
process.on("SIGTERM", shutdown)
process.on("SIGINT", shutdown)
