// Durable Streams conformance suite (@durable-streams/server-conformance-tests 0.3.6)
// run as a local vitest file: the package's own CLI finds no tests once it lives
// under node_modules (vitest 4), so this file calls runConformanceTests itself.
//
// By hand, against any running server (origin only, no trailing slash; the suite
// adds /v1/stream/<name>), from the repo root:
//
//   python -m tests.conformance_run http://127.0.0.1:8000
//   python -m tests.conformance_run --reference      # self-check: upstream Node server
//
// That installs the pinned packages into .cache/node (once), copies this file to
// .cache/node/harness/ and runs there:
//
//   cd .cache/node && CONFORMANCE_BASE_URL=http://127.0.0.1:8000 \
//     npx vitest run harness/conformance.test.mjs
//
// The server under test should use a short long-poll timeout (0.5-1 s). CONFORMANCE_SUBSCRIPTIONS=1
// adds the subscription tests (the server needs STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK=true for them).
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_BASE_URL
if (!baseUrl) {
  throw new Error("set CONFORMANCE_BASE_URL to the server's origin, e.g. http://127.0.0.1:8000")
}

runConformanceTests({
  baseUrl: baseUrl.replace(/\/+$/, ""),
  // Only widens the timeouts of the few tests that wait on a long-poll.
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS ?? 5000),
  // The six opt-in tests of the reserved subscription APIs (webhooks, pull-wake); the server must
  // then allow loopback webhook URLs, where the suite's receiver listens.
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS === "1",
})
