// Drives the upstream TypeScript client (@durable-streams/client) against a server and prints one
// JSON object with what it saw; tests/test_protocol_clients.py checks it. Run from the Node cache
// folder (tests/conformance_run.py copies it next to node_modules).
//
// usage: node ts_client.mjs BASE_URL NAME_PREFIX
import { DurableStream, IdempotentProducer, stream } from "@durable-streams/client"

const [baseUrl, prefix] = process.argv.slice(2)
if (!baseUrl || !prefix) {
  console.error("usage: node ts_client.mjs BASE_URL NAME_PREFIX")
  process.exit(2)
}

// Every wait below has its own deadline; this one ends the process if something still hangs.
const watchdog = setTimeout(() => {
  console.error("ts_client: watchdog fired after 30 s")
  process.exit(3)
}, 30_000)

const TAIL_DEADLINE_MS = 8_000
const APPEND_DELAY_MS = 300
const streamUrl = (name) => `${baseUrl}/v1/stream/${prefix}-${name}`

function withDeadline(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

async function waitFor(predicate, ms, what) {
  const deadline = Date.now() + ms
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

// A fetch that records each request's live mode and, once the first request in `liveMode` has
// been sent, runs `onLiveRequest` after a short delay, so the append lands while the tail waits.
function recordingFetch(liveMode, onLiveRequest) {
  const modes = []
  let fired = false
  const fetchFn = (input, init) => {
    const url = new URL(typeof input === "string" ? input : input.url)
    const mode = url.searchParams.get("live") ?? "catch-up"
    modes.push(mode)
    if (mode === liveMode && !fired) {
      fired = true
      setTimeout(onLiveRequest, APPEND_DELAY_MS)
    }
    return globalThis.fetch(input, init)
  }
  return { fetchFn, modes }
}

function errorSummary(err) {
  return { name: err?.name ?? null, status: err?.status ?? null }
}

function headSummary(head) {
  return { exists: head.exists, contentType: head.contentType, streamClosed: head.streamClosed }
}

async function run() {
  const out = {}
  const offsets = {}

  // create (and an idempotent re-create with the same config)
  const text = await DurableStream.create({ url: streamUrl("text"), contentType: "text/plain", batching: false })
  const json = await DurableStream.create({
    url: streamUrl("json"),
    contentType: "application/json",
    batching: false,
  })
  await DurableStream.create({ url: streamUrl("text"), contentType: "text/plain" })
  const created = await text.head()
  offsets.created = created.offset
  out.create = {
    text: text.contentType,
    json: json.contentType,
    head: headSummary(created),
  }

  // append
  await text.append("hello ")
  offsets.afterHello = (await text.head()).offset
  await text.append("world")
  offsets.afterWorld = (await text.head()).offset
  // 0.2.6 takes JSON as text (objects only from 0.2.7 on); it wraps each value as [value].
  await json.append(JSON.stringify({ n: 1 }))
  await json.append(JSON.stringify({ n: 2, tags: ["a", "b"] }))

  // catch-up read
  const textRes = await stream({ url: streamUrl("text"), live: false })
  const textBody = await withDeadline(textRes.text(), 5_000, "catch-up text")
  const jsonRes = await stream({ url: streamUrl("json"), live: false })
  const jsonBody = await withDeadline(jsonRes.json(), 5_000, "catch-up json")
  out.catchUp = {
    text: textBody,
    textContentType: textRes.contentType,
    textUpToDate: textRes.upToDate,
    textOffsetIsTail: textRes.offset === offsets.afterWorld,
    json: jsonBody,
  }

  // SSE live tail of the JSON stream from its start; {n: 3} is appended while the tail is open
  const sse = recordingFetch("sse", () => json.append(JSON.stringify({ n: 3 })))
  const sseRes = await stream({ url: streamUrl("json"), offset: "-1", live: "sse", fetch: sse.fetchFn })
  const sseItems = []
  let upToDateAtItems = null // how many items had arrived when the tail first reported up to date
  sseRes.subscribeJson(async (batch) => {
    sseItems.push(...batch.items)
    if (batch.upToDate && upToDateAtItems === null) upToDateAtItems = sseItems.length
  })
  await waitFor(() => sseItems.length >= 3, TAIL_DEADLINE_MS, "SSE tail to deliver 3 items")
  await new Promise((resolve) => setTimeout(resolve, 200)) // room for a stray duplicate to show up
  sseRes.cancel("done")
  out.sseTail = {
    items: sseItems,
    upToDateAtItems,
    usedSse: sse.modes.includes("sse"),
    usedLongPoll: sse.modes.includes("long-poll"),
  }

  // long-poll live tail of the text stream from the saved tail offset; "!" arrives while polling
  const lp = recordingFetch("long-poll", () => text.append("!"))
  const lpRes = await stream({
    url: streamUrl("text"),
    offset: offsets.afterWorld,
    live: "long-poll",
    fetch: lp.fetchFn,
  })
  let lpText = ""
  lpRes.subscribeText(async (chunk) => {
    lpText += chunk.text
  })
  await waitFor(() => lpText.length >= 1, TAIL_DEADLINE_MS, "long-poll tail to deliver '!'")
  await new Promise((resolve) => setTimeout(resolve, 200))
  lpRes.cancel("done")
  offsets.afterBang = (await text.head()).offset
  out.longPollTail = { text: lpText, modes: [...new Set(lp.modes)] }

  // resume from saved offsets
  const resumed = await stream({ url: streamUrl("text"), offset: offsets.afterHello, live: false })
  const atTail = await stream({ url: streamUrl("text"), offset: offsets.afterBang, live: false })
  out.resume = {
    fromAfterHello: await withDeadline(resumed.text(), 5_000, "resume read"),
    fromTail: await withDeadline(atTail.text(), 5_000, "read at tail"),
    tailUpToDate: atTail.upToDate,
  }

  // idempotent producer on the JSON stream
  const producer = new IdempotentProducer(json, `${prefix}-producer`, { lingerMs: 0 })
  producer.append(JSON.stringify({ n: 4 }))
  producer.append(JSON.stringify({ n: 5 }))
  await withDeadline(producer.flush(), 5_000, "producer flush")
  const afterProducer = await stream({ url: streamUrl("json"), live: false })
  out.producer = { json: await withDeadline(afterProducer.json(), 5_000, "read after producer") }

  // close: EOF for readers, appends refused, close again is a no-op
  const closed = await text.close()
  offsets.final = closed.finalOffset
  const closedHead = await text.head()
  // 0.2.6 surfaces both refusals as FetchError 409 (its fetch wrapper throws before the
  // StreamClosedError mapping is reached).
  const appendError = await text.append("late").then(() => null, errorSummary)
  const closeWithBodyError = await text.close({ body: "late" }).then(() => null, errorSummary)
  const closedAgain = await text.close()
  const eofRes = await stream({ url: streamUrl("text"), offset: offsets.final, live: "long-poll" })
  let eofText = ""
  eofRes.subscribeText(async (chunk) => {
    eofText += chunk.text
  })
  await withDeadline(eofRes.closed, 5_000, "long-poll tail of a closed stream to end")
  const fullRes = await stream({ url: streamUrl("text"), live: false })
  out.close = {
    head: headSummary(closedHead),
    headOffsetIsFinal: closedHead.offset === closed.finalOffset,
    finalOffsetIsLastAppend: closed.finalOffset === offsets.afterBang,
    appendError,
    closeWithBodyError,
    closeAgainSameOffset: closedAgain.finalOffset === closed.finalOffset,
    eofTail: { text: eofText, streamClosed: eofRes.streamClosed },
    full: await withDeadline(fullRes.text(), 5_000, "read of closed stream"),
  }

  out.offsets = offsets
  return out
}

try {
  const out = await run()
  console.log(JSON.stringify(out))
  clearTimeout(watchdog)
  process.exit(0)
} catch (err) {
  console.log(JSON.stringify({ error: String(err), stack: err?.stack ?? null }))
  process.exit(1)
}
