/* Streamhold live viewer: follows a stream from the offset the server render ended at, with the browser
   client's follow(), which tracks every applied byte range by offset, so reconnects resume exactly. It
   renders with the same renderers as <streamhold-stream>. */
import { createRenderer, follow } from "./streamhold.js";

(() => {
  "use strict";

  const root = document.getElementById("watch");
  if (!root || root.dataset.state === "gone") return;
  const d = root.dataset;
  const kind = d.kind;
  const encoding = d.encoding;
  const WINDOW = Number(d.window);
  const PREVIEW = 1024;
  const MAX_ATTEMPTS = 500;
  const OFFLINE = "Offline, waiting for the network…";
  const LABELS = {
    connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…", closed: "Closed", gone: "Gone", refused: "Refused",
  };
  const $ = (id) => document.getElementById(id);
  const raw = $("raw");
  const jump = $("jump");
  const earlier = $("earlier");
  const scroller = document.scrollingElement;
  const streamPath = `/v1/stream/${d.name.split("/").map(encodeURIComponent).join("/")}`;
  // A page opened by a share link reads with it: its `share` goes on every request the page makes.
  const share = new URLSearchParams(location.search).get("share");
  const withShare = (path, params = {}) => {
    const u = new URL(path, location.href);
    if (share) u.searchParams.set("share", share);
    for (const [key, value] of Object.entries(params)) u.searchParams.set(key, String(value));
    return u.href;
  };

  let start = Number(d.start);
  let offset = Number(d.offset);
  let size = Number(d.size);
  let closed = d.closed === "true";
  let gone = false;
  let chunks = [{ a: start, b: offset, text: raw ? raw.textContent : "" }];
  let following = !closed;
  let scrollQueued = false;

  // Plain text shows in the raw <pre> itself, which the server rendered.
  const renderer = createRenderer(kind === "text" ? "none" : kind, $("rendered") || $("view"), {
    header: d.header, head: d.head, preview: PREVIEW, tsv: /tab-separated/.test(d.contentType || ""),
  });
  renderer.reset(chunks[0].text, { lineStart: true, atStreamStart: start === 0 });

  // The first field is the stream's generation: a stream deleted and created again under this name refuses
  // this page's offsets (410) rather than continuing it with another stream's bytes.
  const generation = String(d.generation || "0").padStart(16, "0");
  const token = (n) => `${generation}_${String(n).padStart(16, "0")}`;
  const parseOffset = (t) => {
    const m = /^\d+_(\d+)$/.exec(t || "");
    return m ? Number(m[1]) : -1;
  };

  // The server's humanize.human_bytes, repeated so the size can change live: keep the two alike.
  function human(n) {
    if (n < 1024) return `${n.toLocaleString("en-US")} B`;
    let value = n;
    let unit = "";
    for (unit of ["KiB", "MiB", "GiB", "TiB", "PiB"]) {
      value /= 1024;
      if (Math.round(value) < 1024) break;
    }
    if (Math.round(value * 10) / 10 < 100) return `${value.toFixed(1)} ${unit}`;
    return `${Math.round(value).toLocaleString("en-US")} ${unit}`;
  }

  function setState(state, label) {
    d.state = state;
    root.querySelector("#status .label").textContent = label || LABELS[state];
    if (state !== "live") jump.hidden = true;
  }

  function showFigures() {
    d.offset = String(offset);
    d.start = String(start);
    d.size = String(size);
    const sizeEl = $("size");
    sizeEl.textContent = human(size);
    sizeEl.title = `${size.toLocaleString()} bytes`;
    for (const node of root.querySelectorAll(".size-text")) node.textContent = human(size);
    if ($("shown")) $("shown").textContent = human(offset - start);
    if (earlier) earlier.hidden = start === 0;
    if ($("empty-note") && (size > 0 || closed)) $("empty-note").remove();
  }

  /* ---- following the reader ---- */

  const atBottom = () => scroller.scrollHeight - scroller.scrollTop - window.innerHeight < 48;

  function stick() {
    if (!following || scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      renderer.flush();
      if (following) scroller.scrollTop = scroller.scrollHeight;
    });
  }

  window.addEventListener("scroll", () => {
    if (scrollQueued) return;
    following = atBottom();
    jump.hidden = following || d.state !== "live";
  }, { passive: true });

  jump.addEventListener("click", () => {
    following = true;
    jump.hidden = true;
    stick();
  });

  /* ---- applying data ---- */

  async function fetchBytes(from, to) {
    const response = await fetch(withShare(streamPath, { offset: token(from) }), { cache: "no-store" });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const reader = response.body.getReader();
    const out = new Uint8Array(to - from);
    let n = 0;
    while (n < out.length) {
      const { done, value } = await reader.read();
      if (done) break;
      const take = Math.min(value.length, out.length - n);
      out.set(value.subarray(0, take), n);
      n += take;
    }
    reader.cancel().catch(() => {});
    return out.subarray(0, n);
  }

  /** One chunk from follow(): its text (or bytes, for the hex view) joins the page at its offset. */
  function apply(chunk) {
    const from = parseOffset(chunk.from);
    const to = parseOffset(chunk.offset);
    if (to < from || from !== offset) return;  // follow() hands on each byte once, in order
    const text = kind === "binary" ? "" : chunk.text;
    if (kind === "binary") renderer.bytes(chunk.bytes);
    const last = chunks[chunks.length - 1];
    if (kind === "binary") chunks = [];
    else if (last && last.b === from && last.b - last.a < 16384) {
      last.b = to;
      last.text += text;
    } else chunks.push({ a: from, b: to, text });
    offset = to;
    size = Math.max(size, to);
    if (raw && text) raw.append(text);
    if (text) renderer.append(text);
    trim();
    showFigures();
    stick();
    if (!following && d.state === "live") jump.hidden = false;
  }

  function finish() {
    closed = true;
    d.closed = "true";
    renderer.finish();
    setState("closed");
    showFigures();
  }

  /* Keep the page to about two windows while the reader is at the bottom: drop whole chunks from the top. */
  function trim() {
    if (!following || kind === "binary" || offset - start <= 2 * WINDOW || chunks.length < 2) return;
    let cut = 0;
    while (cut < chunks.length - 1 && offset - chunks[cut + 1].a >= WINDOW) cut++;
    if (!cut) return;
    const lineStart = chunks[cut - 1].text.endsWith("\n");
    chunks = chunks.slice(cut);
    start = chunks[0].a;
    const text = chunks.map((c) => c.text).join("");
    if (raw) raw.textContent = text;
    renderer.reset(text, { lineStart, atStreamStart: false });
  }

  async function loadEarlier(button) {
    button.disabled = true;
    try {
      let from;
      let text;
      if (encoding === "json") {
        const response = await fetch(withShare(location.pathname, { before: start }), { cache: "no-store" });
        if (!response.ok) throw new Error(`the server answered ${response.status}`);
        from = Number(response.headers.get("stream-range-start"));
        text = await response.text();
      } else {
        from = Math.max(0, start - WINDOW);
        const bytes = await fetchBytes(from, start);
        let skip = 0;
        if (from > 0) {
          const newline = kind === "csv" || kind === "json" ? bytes.indexOf(10) : -1;
          skip = newline >= 0 ? newline + 1 : 0;
          while (skip < bytes.length && (bytes[skip] & 0xc0) === 0x80) skip++;
        }
        from += skip;
        text = new TextDecoder().decode(bytes.subarray(skip));
      }
      const height = scroller.scrollHeight;
      chunks.unshift({ a: from, b: start, text });
      start = from;
      if (raw) raw.prepend(text);
      renderer.reset(chunks.map((c) => c.text).join(""), { lineStart: true, atStreamStart: start === 0 });
      scroller.scrollTop += scroller.scrollHeight - height;
      showFigures();
    } catch (error) {
      button.textContent = `Could not load (${error.message}); try again`;
    } finally {
      button.disabled = false;
    }
  }

  /* ---- the live connection ---- */

  function connect() {
    follow(withShare(streamPath), {
      offset: token(offset),
      exact: false,  // for display: a lone CR may show as a line break, saving a read per line
      maxRetries: MAX_ATTEMPTS,
      onData: apply,
      onState(state, detail) {
        if (state === "live" || state === "connecting") setState(state);
        else if (state === "reconnecting") setState(state, detail === "offline" ? OFFLINE : LABELS.reconnecting);
      },
      onClose: finish,
    }).catch((error) => {
      if (error && (error.status === 404 || error.status === 410)) setGone();
      else if (error && (error.status === 401 || error.status === 403)) setState("refused", `Refused: ${error.message}`);
      else setState("reconnecting", "Disconnected: reload to try again");
    });
  }

  function setGone() {
    gone = true;
    setState("gone");
    const note = document.createElement("p");
    note.className = "gone-note";
    note.textContent = "This stream was deleted or has expired. What you see is what had arrived before.";
    $("view").before(note);
  }

  /* ---- controls ---- */

  const copy = $("copy-link");
  const shareTtl = $("share-ttl");

  /* The link to copy: the page's own share link, a new one (a private stream, from a page that may make
     links), or the page's plain address. */
  async function linkToCopy() {
    if (share) return withShare(location.pathname);
    if (!shareTtl) return location.origin + location.pathname;
    const response = await fetch(`/stream/${encodeURIComponent(copy.dataset.stream)}/share`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": copy.dataset.csrf || "" },
      body: JSON.stringify({ ttl: Number(shareTtl.value) }),
      credentials: "same-origin",
      cache: "no-store",
    });
    let answer = {};
    try {
      answer = await response.json();
    } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error(answer.error || `the server answered ${response.status}`);
    return answer.url;
  }

  if (copy) copy.addEventListener("click", async () => {
    let done = false;
    let url = "";
    try {
      url = await linkToCopy();
      await navigator.clipboard.writeText(url);
      done = true;
    } catch (error) {
      if (url) {
        const field = Object.assign(document.createElement("textarea"), { value: url });
        document.body.append(field);
        field.select();
        done = document.execCommand("copy");
        field.remove();
      } else copy.title = `Could not make a share link: ${error.message}`;
    }
    copy.textContent = done ? "Copied ✓" : "Copy failed";
    setTimeout(() => { copy.textContent = "Copy link"; }, 1600);
  });

  const toggle = $("toggle-source");
  if (toggle) {
    toggle.addEventListener("click", () => {
      const on = root.classList.toggle("show-source");
      toggle.setAttribute("aria-pressed", String(on));
    });
  }

  const more = $("load-earlier");
  if (more) more.addEventListener("click", () => loadEarlier(more));

  history.scrollRestoration = "manual";
  showFigures();
  if (closed) {
    renderer.finish();
    setState("closed");
  } else {
    stick();
    connect();
  }
})();
