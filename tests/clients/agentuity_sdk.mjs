// Drives Agentuity's own SDK (@agentuity/core StreamStorageService with @agentuity/server's fetch adapter,
// as an external Node backend constructs it) against a Streamhold server, and prints one JSON object with
// what it saw; tests/test_agentuity_sdk.py checks it. Run from the Node cache folder
// (tests/conformance_run.py copies it next to node_modules).
//
// usage: node agentuity_sdk.mjs ORIGIN API_KEY RUN_ID MAX_APPEND_BYTES
import { StreamStorageService } from "@agentuity/core"
import { createServerFetchAdapter } from "@agentuity/server"

const [origin, apiKey, runId, maxAppendText] = process.argv.slice(2)
if (!origin || !apiKey || !runId || !maxAppendText) {
  console.error("usage: node agentuity_sdk.mjs ORIGIN API_KEY RUN_ID MAX_APPEND_BYTES")
  process.exit(2)
}
const maxAppend = Number(maxAppendText)

// Every wait below has its own deadline; this one ends the process if something still hangs.
const watchdog = setTimeout(() => {
  console.error("agentuity_sdk: watchdog fired after 45 s")
  process.exit(3)
}, 45_000)

const quiet = { trace() {}, debug() {}, info() {}, warn() {}, error() {}, fatal() {} }
quiet.child = () => quiet

function service(base, key) {
  const adapter = createServerFetchAdapter({ headers: { Authorization: `Bearer ${key}` } }, quiet)
  return new StreamStorageService(base, adapter)
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function withDeadline(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

async function text(body) {
  const chunks = []
  const reader = body.getReader()
  while (true) {
    const { done, value } = await reader.read()
    if (done) break
    chunks.push(Buffer.from(value))
  }
  return Buffer.concat(chunks).toString("utf8")
}

async function failure(work) {
  try {
    await work()
  } catch (error) {
    return { tag: error._tag ?? error.name, statusCode: error.statusCode, status: error.status, message: error.message }
  }
  return null
}

const streams = service(`${origin}/stream`, apiKey)
const ns = `agentuity-${runId}`
const out = {}

// Create with every option, then write strings, bytes, an ArrayBuffer, an object and a number.
const report = await streams.create(ns, {
  contentType: "text/csv",
  compress: true,
  metadata: { run: runId, kind: "report" },
  ttl: 3600,
})
out.created = { id: report.id, url: report.url, compressed: report.compressed }
await report.write("name,email\n")
await report.write(new TextEncoder().encode("ada,ada@example.com\n"))
await report.write(new TextEncoder().encode("# ").buffer)
await report.write({ note: "object", n: 1 })
await report.write(42)
out.bytesWritten = report.bytesWritten
await report.close()
await report.close()
await report.write("ignored: the SDK drops writes after close")
out.info = await streams.get(report.id)
out.downloaded = await text(await streams.download(report.id))
const publicRead = await fetch(report.url)
out.publicRead = {
  status: publicRead.status,
  contentType: publicRead.headers.get("content-type"),
  contentEncoding: publicRead.headers.get("content-encoding"),
  text: await publicRead.text(),
}

// Two more streams for filtering and paging: one that never expires, one with the default TTL.
const audit = await streams.create(ns, { contentType: "application/json", metadata: { run: runId, kind: "audit" }, ttl: null })
await audit.write({ event: "start" })
await audit.close()
const blob = await streams.create(ns, { metadata: { run: runId, kind: "report" } })
await blob.write(new Uint8Array([0, 1, 2, 255]))
await blob.close()
out.neverExpires = await streams.get(audit.id)
out.defaultTtl = await streams.get(blob.id)
out.blobBytes = [...Buffer.from(await (await fetch(blob.url)).arrayBuffer())]

const ids = (page) => page.streams.map((s) => s.id)
const all = await streams.list({ namespace: ns })
const reports = await streams.list({ namespace: ns, metadata: { kind: "report" } })
const first = await streams.list({ namespace: ns, limit: 2 })
const second = await streams.list({ namespace: ns, limit: 2, offset: 2 })
const bySize = await streams.list({ name: ns, sort: "size", direction: "asc" })
out.list = {
  all: { success: all.success, total: all.total, ids: ids(all), first: all.streams[0] },
  reports: { total: reports.total, ids: ids(reports) },
  first: { total: first.total, ids: ids(first) },
  second: { total: second.total, ids: ids(second) },
  bySize: ids(bySize),
  ids: { report: report.id, audit: audit.id, blob: blob.id },
}

// A reader that starts before the first write receives each write as it lands, and ends at close.
const live = await streams.create(ns, { contentType: "text/plain" })
const reader = live.getReader().getReader()
const received = []
const reading = (async () => {
  while (true) {
    const { done, value } = await reader.read()
    if (done) break
    received.push(Buffer.from(value).toString("utf8"))
  }
})()
await sleep(300)
await live.write("tick-1 ")
await sleep(300)
await live.write("tick-2")
await sleep(300)
await live.close()
await withDeadline(reading, 10_000, "the live reader to end at close")
out.tail = { text: received.join(""), chunks: received.length }

// Errors: a write over the server's limit, and a stream after delete.
const big = await streams.create(ns, {})
out.tooLarge = await failure(() => big.write(new Uint8Array(maxAppend + 1)))
await big.close()
await streams.delete(blob.id)
out.getDeleted = await failure(() => streams.get(blob.id))
out.downloadDeleted = await failure(() => streams.download(blob.id))
out.deleteTwice = await failure(() => streams.delete(blob.id))
out.wrongKey = await failure(() => service(`${origin}/stream`, "not-the-key").list())

// The SDK's default base URL has no /stream prefix; the same calls work at the root.
const rooted = service(origin, apiKey)
const atRoot = await rooted.create(`${ns}-root`, { contentType: "text/plain", metadata: { run: runId } })
await atRoot.write("at the root")
await atRoot.close()
out.root = {
  url: atRoot.url,
  info: await rooted.get(atRoot.id),
  downloaded: await text(await rooted.download(atRoot.id)),
  listed: (await rooted.list({ namespace: `${ns}-root` })).total,
}
await rooted.delete(atRoot.id)
out.root.afterDelete = await failure(() => rooted.get(atRoot.id))

clearTimeout(watchdog)
console.log(JSON.stringify(out))
