/* Streamhold's browser client, one dependency-free ES module:
   - follow(url, options): replays a stream over the Durable Streams protocol, then tails it (SSE, or
     long-poll where SSE is cut), resuming from the last offset it applied after any drop or restart;
   - createRenderer(kind, host, options): the viewer's renderers (Markdown, CSV, JSON records, hex);
   - <streamhold-stream src="…">: a custom element that shows a stream with those renderers.
   Stream content only ever becomes text nodes and a fixed set of elements (never innerHTML), and links
   keep to http(s) and mailto, so a hostile stream cannot run script in the page that shows it. */

/* ======================================== renderers ======================================== */

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function safeHref(url) {
  try {
    const parsed = new URL(url, location.href);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch (_) {
    return null;
  }
}

/* ---- Markdown: blocks are committed at blank lines outside code fences; only the tail re-renders. ---- */

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const LIST = /^( {0,3})([-*+]|\d{1,9}[.)])(\s+|$)(.*)$/;
const DELIM = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const HR = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*$/;
const BLANK = /^\s*$/;
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",                      // 1,2 code span
  "(!?)\\[([^\\]]*)\\]\\(\\s*<?([^\\s)>]*)>?(?:\\s+\"[^\"]*\")?\\s*\\)", // 3,4,5 link or image
  "<((?:https?://|mailto:)[^>\\s]+)>",                            // 6 autolink
  "(\\*\\*|__)(?=\\S)([\\s\\S]*?\\S)\\7",                         // 7,8 strong
  "(?<![\\w*])(\\*|_)(?=[^\\s*_])([\\s\\S]*?[^\\s*_])\\9(?![\\w*])", // 9,10 emphasis
  "~~(?=\\S)([\\s\\S]*?\\S)~~",                                    // 11 strikethrough
  "(https?://[^\\s<>]*[^\\s<>.,:;\"')\\]*_~])",                   // 12 bare URL
  "\\\\([\\\\`*_{}\\[\\]()#+\\-.!|~>])",                          // 13 escape
  "( {2,}|\\\\)\\n",                                               // 14 hard break
].join("|"), "g");

function inline(text, parent) {
  const re = new RegExp(INLINE.source, "g");
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    last = re.lastIndex;
    if (m[1]) parent.append(el("code", "", m[2].replace(/^ (.+) $/, "$1")));
    else if (m[4] !== undefined || m[5] !== undefined) {
      const href = safeHref(m[5]);
      const label = m[3] ? (m[4] || m[5]) : m[4];
      if (!href) { parent.append(m[0]); continue; }
      const a = el("a", m[3] ? "img-link" : "");
      a.href = href;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      if (m[3]) a.append("🖼 ");
      inline(label || m[5], a);
      parent.append(a);
    } else if (m[6] || m[12]) {
      const href = safeHref(m[6] || m[12]);
      if (!href) { parent.append(m[0]); continue; }
      const a = el("a", "", m[6] || m[12]);
      a.href = href;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      parent.append(a);
    } else if (m[7]) inline(m[8], parent.appendChild(el("strong")));
    else if (m[9]) inline(m[10], parent.appendChild(el("em")));
    else if (m[11]) inline(m[11], parent.appendChild(el("del")));
    else if (m[13]) parent.append(m[13]);
    else if (m[14]) parent.append(el("br"));
  }
  if (last < text.length) parent.append(text.slice(last));
  return parent;
}

const indentOf = (line) => line.length - line.trimStart().length;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || HR.test(line) || /^ {0,3}>/.test(line) ||
    /^ {0,3}([-*+]|1[.)])\s+\S/.test(line);
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function blocks(text) {
  const lines = text.split("\n").map((line) => line.replace(/\r$/, ""));
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (BLANK.test(line)) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
      const code = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) code.push(lines[i]);
      i++;
      const pre = el("pre");
      pre.append(el("code", m[2] ? `language-${m[2]}` : "", code.join("\n")));
      out.push(pre);
    } else if ((m = HEADING.exec(line))) {
      const body = (m[2] || "").replace(/\s+#+$/, "").replace(/^#+$/, "");
      out.push(inline(body, el(`h${m[1].length}`)));
      i++;
    } else if (HR.test(line)) {
      out.push(el("hr"));
      i++;
    } else if (/^ {0,3}>/.test(line)) {
      const inner = [];
      while (i < lines.length && !BLANK.test(lines[i]) && (/^ {0,3}>/.test(lines[i]) || !startsBlock(lines[i]))) {
        inner.push(lines[i].replace(/^ {0,3}> ?/, ""));
        i++;
      }
      const quote = el("blockquote");
      quote.append(...blocks(inner.join("\n")));
      out.push(quote);
    } else if (LIST.test(line)) {
      i = list(lines, i, out);
    } else if (line.includes("|") && i + 1 < lines.length && DELIM.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = table(lines, i, out);
    } else {
      const para = [];
      while (i < lines.length && !BLANK.test(lines[i]) && (para.length === 0 || !startsBlock(lines[i]))) {
        if (para.length && lines[i].includes("|") && DELIM.test(lines[i + 1] || "")) break;
        para.push(lines[i].replace(/^\s+/, ""));
        i++;
      }
      out.push(inline(para.join("\n"), el("p")));
    }
  }
  return out;
}

function list(lines, i, out) {
  const first = LIST.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  const number = parseInt(first[2], 10);
  if (ordered && number !== 1) node.start = number;
  const items = [];
  let item = null;
  while (i < lines.length) {
    const line = lines[i];
    const m = LIST.exec(line);
    if (m && m[1].length <= first[1].length + 1 && /\d/.test(m[2]) === ordered) {
      item = { lines: [m[4]], indent: m[1].length + m[2].length + Math.max(1, Math.min(m[3].length, 4)) };
      items.push(item);
    } else if (BLANK.test(line)) {
      if (!lines[i + 1] || indentOf(lines[i + 1]) < item.indent) break;
      item.lines.push("");
    } else if (indentOf(line) >= Math.min(item.indent, first[1].length + 2)) {
      item.lines.push(line.slice(Math.min(indentOf(line), item.indent)));
    } else if (!startsBlock(line) && !m) {
      item.lines.push(line.trim());
    } else break;
    i++;
  }
  for (const entry of items) {
    const li = el("li");
    let body = entry.lines.join("\n");
    const task = /^\[([ xX])\]\s+/.exec(body);
    if (task) {
      li.append(task[1] === " " ? "☐ " : "☑ ");
      body = body.slice(task[0].length);
    }
    const parts = blocks(body);
    if (parts.length && parts[0].tagName === "P") li.append(...parts.shift().childNodes);
    li.append(...parts);
    node.append(li);
  }
  out.push(node);
  return i;
}

function table(lines, i, out) {
  const head = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : ""));
  const node = el("table");
  const tr = node.createTHead().insertRow();
  head.forEach((cell, n) => {
    const th = inline(cell, el("th"));
    if (aligns[n]) th.style.textAlign = aligns[n];
    tr.append(th);
  });
  const body = node.createTBody();
  for (i += 2; i < lines.length && lines[i].includes("|") && !BLANK.test(lines[i]); i++) {
    const row = body.insertRow();
    cells(lines[i]).slice(0, Math.max(head.length, 1)).forEach((cell, n) => {
      const td = inline(cell, el("td"));
      if (aligns[n]) td.style.textAlign = aligns[n];
      row.append(td);
    });
  }
  out.push(node);
  return i;
}

function markdownView(host) {
  const root = el("div", "md");
  const done = el("div", "md-done");
  const live = el("div", "md-live");
  root.append(done, live);
  host.replaceChildren(root);
  let source = "";
  let committed = 0;
  let queued = false;

  function boundary() {
    let fence = null;
    let at = committed;
    let last = committed;
    for (let nl = source.indexOf("\n", at); nl >= 0; at = nl + 1, nl = source.indexOf("\n", at)) {
      const line = source.slice(at, nl);
      const m = FENCE.exec(line);
      if (fence) {
        if (m && m[1][0] === fence[0] && m[1].length >= fence.length && !m[2]) fence = null;
      } else if (m) fence = m[1];
      else if (BLANK.test(line)) last = nl + 1;
    }
    return last;
  }

  function render() {
    queued = false;
    const end = boundary();
    if (end > committed) {
      done.append(...blocks(source.slice(committed, end)));
      committed = end;
    }
    live.replaceChildren(...blocks(source.slice(committed)));
    // The typing caret goes after the deepest last element, so it sits at the end of the text.
    const old = root.querySelector(".caret-here");
    if (old) old.classList.remove("caret-here");
    let node = live.lastElementChild || done.lastElementChild;
    while (node && node.lastElementChild && node.lastElementChild.tagName !== "BR") node = node.lastElementChild;
    if (node) node.classList.add("caret-here");
  }

  return {
    reset(text) {
      source = text;
      committed = 0;
      done.replaceChildren();
      render();
    },
    append(text) {
      source += text;
      if (!queued) {
        queued = true;
        requestAnimationFrame(render);
      }
    },
    flush() { if (queued) render(); },
    finish() { this.flush(); },
  };
}

/* ---- CSV: an RFC 4180 parser fed piece by piece; the row still being written shows as partial. ---- */

function csvView(host, options) {
  const delimiter = options.tsv ? "\t" : ",";
  const wrap = el("div", "table-wrap");
  const node = el("table", "csv");
  const head = node.createTHead();
  const body = node.createTBody();
  const count = el("p", "csv-count");
  wrap.append(node);
  host.replaceChildren(wrap, count);
  let header = null;
  let numbered = true;
  let rows = 0;
  let state;
  let partial = null;

  function fresh() {
    return { field: "", row: [], quoted: false, quote: false, skipLine: false, fieldStarted: false };
  }

  function setHeader(cellsOfRow) {
    header = cellsOfRow;
    const tr = head.insertRow();
    tr.append(el("th", "n", numbered ? "#" : ""));
    for (const cell of cellsOfRow) tr.append(el("th", "", cell));
  }

  function addRow(cellsOfRow) {
    if (!header && numbered) {
      setHeader(cellsOfRow);
      return;
    }
    rows++;
    body.append(fill(document.createElement("tr"), cellsOfRow, numbered ? String(rows) : ""));
  }

  function fill(tr, cellsOfRow, number) {
    tr.replaceChildren(el("td", "n", number));
    for (const cell of cellsOfRow) tr.append(el("td", "", cell));
    return tr;
  }

  function scan(s, text, onRow) {
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (s.skipLine) {
        if (c === "\n") s.skipLine = false;
        continue;
      }
      if (s.quoted) {
        if (s.quote) {
          s.quote = false;
          if (c === '"') { s.field += '"'; continue; }
          s.quoted = false;
        } else if (c === '"') { s.quote = true; continue; } else { s.field += c; continue; }
      }
      if (c === '"' && !s.fieldStarted) { s.quoted = true; s.fieldStarted = true; } else if (c === delimiter) {
        s.row.push(s.field);
        s.field = "";
        s.fieldStarted = false;
      } else if (c === "\n") {
        s.row.push(s.field);
        const complete = s.row;
        s.field = "";
        s.row = [];
        s.fieldStarted = false;
        if (!(complete.length === 1 && complete[0] === "")) onRow(complete);
      } else if (c !== "\r") { s.field += c; s.fieldStarted = true; }
    }
  }

  function feed(text) {
    scan(state, text, (cellsOfRow) => addRow(cellsOfRow));
    showPartial();
  }

  function showPartial() {
    const pending = state.row.length || state.field || state.quoted;
    if (!pending) {
      if (partial) partial.remove();
      partial = null;
    } else if (header || !numbered) {
      partial = fill(partial || el("tr", "partial"), [...state.row, state.field], "…");
      body.append(partial);
    }
    count.textContent = `${rows.toLocaleString()} row${rows === 1 ? "" : "s"}${pending ? " and one being written" : ""}`;
  }

  return {
    reset(text, opts) {
      head.replaceChildren();
      body.replaceChildren();
      header = null;
      rows = 0;
      partial = null;
      numbered = opts.atStreamStart;
      if (!numbered && options.header) {
        let first = null;
        scan(fresh(), `${options.header}\n`, (cellsOfRow) => { first = first || cellsOfRow; });
        if (first) setHeader(first);
      }
      state = fresh();
      state.skipLine = !opts.lineStart && !opts.atStreamStart;
      feed(text);
    },
    append: feed,
    flush() {},
    finish() {
      if (state.row.length || state.field) {
        if (partial) partial.remove();
        partial = null;
        feed("\n");
      }
    },
  };
}

/* ---- JSON records: one JSON text after another (JSON mode, NDJSON, or concatenated writes). ---- */

const JSON_TOKEN = /("(?:\\.|[^"\\])*")(\s*:)?|\b(?:true|false|null)\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

function oneLine(value) {
  if (Array.isArray(value)) return `[${value.map(oneLine).join(", ")}]`;
  if (value && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${oneLine(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

function highlight(value) {
  const compact = JSON.stringify(value);
  const text = compact.length <= 96 ? oneLine(value) : JSON.stringify(value, null, 2);
  const pre = el("pre");
  const re = new RegExp(JSON_TOKEN.source, "g");
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    if (m.index > last) pre.append(text.slice(last, m.index));
    if (m[1]) {
      pre.append(el("span", m[2] ? "j-key" : "j-str", m[1]));
      if (m[2]) pre.append(m[2]);
    } else pre.append(el("span", /^[tfn]/.test(m[0]) ? "j-lit" : "j-num", m[0]));
    last = re.lastIndex;
  }
  pre.append(text.slice(last));
  return pre;
}

function jsonView(host) {
  const list = el("ol", "records");
  host.replaceChildren(list);
  let pending = "";
  let pos = 0;
  let kind = null;
  let depth = 0;
  let inString = false;
  let escaped = false;
  let count = 0;
  let skipLine = false;
  let pendingNode = null;

  function card(cls, label) {
    const li = el("li", `record ${cls}`);
    const header = el("header");
    header.append(el("span", "", label));
    li.append(header);
    return li;
  }

  function add(segment) {
    count++;
    let value;
    try {
      value = JSON.parse(segment);
    } catch (_) {
      const li = card("invalid", `#${count} · not valid JSON`);
      li.append(el("pre", "", segment));
      list.append(li);
      return;
    }
    const li = card("", `#${count}`);
    if (value && typeof value === "object" && !Array.isArray(value)) {
      const tag = ["event", "type", "level", "kind", "status"].map((k) => value[k]).find((v) => typeof v === "string");
      if (tag) li.firstChild.append(el("span", "tag", tag));
      const at = ["at", "timestamp", "ts", "time"].map((k) => value[k]).find((v) => typeof v === "string");
      if (at) li.firstChild.append(el("span", "", at));
    }
    li.append(highlight(value));
    list.append(li);
  }

  function feed(text) {
    pending += text;
    let segStart = 0;
    let i = pos;
    for (; i < pending.length; i++) {
      const c = pending[i];
      if (skipLine) {
        if (c === "\n") { skipLine = false; segStart = i + 1; }
        continue;
      }
      if (kind === null) {
        if (c === " " || c === "\n" || c === "\r" || c === "\t") { segStart = i + 1; continue; }
        kind = c === "{" || c === "[" ? "nest" : c === '"' ? "str" : "scalar";
        depth = kind === "nest" ? 1 : 0;
        inString = kind === "str";
        continue;
      }
      if (inString) {
        if (escaped) escaped = false;
        else if (c === "\\") escaped = true;
        else if (c === '"') {
          inString = false;
          if (kind === "str") { add(pending.slice(segStart, i + 1)); segStart = i + 1; kind = null; }
        }
      } else if (kind === "nest") {
        if (c === '"') inString = true;
        else if (c === "{" || c === "[") depth++;
        else if ((c === "}" || c === "]") && --depth === 0) { add(pending.slice(segStart, i + 1)); segStart = i + 1; kind = null; }
      } else if (/[\s{["]/.test(c)) {
        add(pending.slice(segStart, i));
        segStart = i;
        kind = null;
        i--;
      }
    }
    pending = pending.slice(segStart);
    pos = i - segStart;
    showPending();
  }

  function showPending() {
    if (pendingNode) pendingNode.remove();
    pendingNode = null;
    if (pending.trim()) {
      pendingNode = card("pending", `#${count + 1} · receiving ${pending.length.toLocaleString()} characters…`);
      pendingNode.append(el("pre", "", pending.length > 2000 ? `${pending.slice(0, 2000)}…` : pending));
      list.append(pendingNode);
    }
  }

  return {
    reset(text, opts) {
      list.replaceChildren();
      pending = "";
      pos = 0;
      kind = null;
      count = 0;
      inString = escaped = false;
      pendingNode = null;
      skipLine = !opts.lineStart && !opts.atStreamStart;
      feed(text);
    },
    append: feed,
    flush() {},
    finish() {
      if (kind === "scalar") {
        add(pending);
        pending = "";
        kind = null;
      } else if (pending.trim()) {
        add(pending);
        pending = "";
      }
      showPending();
    },
  };
}

/* ---- Binary: the size and a hex dump of the first bytes. ---- */

function binaryView(host, options) {
  let table = host.querySelector("#hex");
  let caption = host.querySelector("#hex-caption");
  if (!table) {
    table = el("table", "hex");
    caption = table.createCaption();
    table.createTBody();
    host.replaceChildren(table);
  }
  let head = Uint8Array.from(atob(options.head || ""), (c) => c.charCodeAt(0));
  return {
    reset() {},
    flush() {},
    finish() {},
    append() {},
    bytes(data) {
      if (head.length >= options.preview) return;
      const merged = new Uint8Array(Math.min(options.preview, head.length + data.length));
      merged.set(head);
      merged.set(data.subarray(0, merged.length - head.length), head.length);
      head = merged;
      const body = table.tBodies[0];
      body.replaceChildren();
      for (let at = 0; at < head.length; at += 16) {
        const piece = head.subarray(at, at + 16);
        const row = body.insertRow();
        row.append(el("th", "", at.toString(16).padStart(8, "0")));
        row.append(el("td", "", Array.from(piece, (b) => b.toString(16).padStart(2, "0")).join(" ")));
        row.append(el("td", "", Array.from(piece, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("")));
      }
      caption.textContent = `The first ${head.length} bytes`;
    },
  };
}

/* ---- Plain text: appended to one <pre>. ---- */

function textView(host) {
  const pre = el("pre", "streamhold-text");
  host.replaceChildren(pre);
  return {
    reset(text) { pre.textContent = text; },
    append(text) { pre.append(text); },
    flush() {},
    finish() {},
  };
}

const noop = { reset() {}, append() {}, flush() {}, finish() {} };

/**
 * @typedef {object} Renderer
 * @property {(text: string, opts: {lineStart: boolean, atStreamStart: boolean}) => void} reset
 *   Show `text` afresh; `lineStart` says it begins a line, `atStreamStart` that it is the stream's start.
 * @property {(text: string) => void} append  Add text that arrived (may render on the next frame).
 * @property {() => void} flush  Render what is pending now.
 * @property {() => void} finish  The stream closed: render the last, unterminated part too.
 * @property {(bytes: Uint8Array) => void} [bytes]  Binary streams: the bytes that arrived.
 */

/**
 * A renderer of `kind` ("markdown", "csv", "json", "text", "binary"; anything else renders nothing) into
 * `host`. Options: `header` (a CSV header line when the text starts past it), `tsv`, and for binary
 * `head` (base64 of the first bytes) and `preview` (how many bytes the hex dump shows).
 * @param {string} kind
 * @param {HTMLElement} host
 * @param {{header?: string, tsv?: boolean, head?: string, preview?: number}} [options]
 * @returns {Renderer}
 */
export function createRenderer(kind, host, options = {}) {
  if (kind === "markdown") return markdownView(host);
  if (kind === "csv") return csvView(host, options);
  if (kind === "json") return jsonView(host);
  if (kind === "text") return textView(host);
  if (kind === "binary") return binaryView(host, options);
  return noop;
}

const MARKDOWN = ["text/markdown", "text/x-markdown"];
const CSV = ["text/csv", "text/tab-separated-values"];
const JSON_TYPES = ["application/json", "application/x-ndjson", "application/ndjson", "application/jsonl",
  "application/x-jsonlines"];

/**
 * How a content type renders: "markdown", "csv", "json", "text" or "binary" (as the server's viewer decides).
 * @param {string} contentType
 * @returns {string}
 */
export function viewKind(contentType) {
  const type = String(contentType || "").split(";")[0].trim().toLowerCase();
  if (MARKDOWN.includes(type)) return "markdown";
  if (CSV.includes(type)) return "csv";
  if (JSON_TYPES.includes(type) || type.endsWith("+json")) return "json";
  if (type.startsWith("text/")) return "text";
  return "binary";
}

/* ========================================= follow ========================================= */

/**
 * @typedef {"connecting"|"live"|"reconnecting"|"closed"|"gone"|"refused"|"stopped"} FollowState
 *
 * @typedef {object} Chunk
 * @property {Uint8Array} bytes  The exact bytes of the stream in [from, offset) (JSON mode: the body read).
 * @property {string} text  Those bytes as text; a UTF-8 character split across chunks comes whole, in the
 *   chunk that completes it. JSON mode: one JSON text per message, each ending in a newline.
 * @property {unknown[]} [messages]  JSON mode only: the messages.
 * @property {string} from  The offset the chunk starts at.
 * @property {string} offset  The offset after it: where a later `follow` resumes.
 * @property {string} contentType  The stream's content type.
 *
 * @typedef {object} FollowOptions
 * @property {string} [offset]  Where to start: "-1" (the default) is the beginning, "now" the tail, or an
 *   offset an earlier `follow` handed out.
 * @property {(chunk: Chunk) => void} [onData]  Called once per chunk, in order, never twice for a byte.
 * @property {(offset: string) => void} [onClose]  The stream was closed by its writer and all of it was read.
 * @property {(state: FollowState, detail?: string) => void} [onState]  Connection state changes.
 * @property {AbortSignal} [signal]  Aborting stops following (the promise resolves with closed: false).
 * @property {"sse"|"long-poll"} [live]  How to tail: SSE (the default, falling back to long-poll when SSE
 *   is cut on the way) or long-poll only.
 * @property {number} [maxRetries]  Consecutive failed attempts before giving up (default 1000).
 * @property {boolean} [exact]  true (the default): bytes are exact even where SSE cannot carry them, at the
 *   cost of one plain read per SSE event that holds a line break (SSE cannot tell CR from LF). false: such
 *   reads only when the byte count shows a change (CRLF, half a character), so a lone CR may arrive as LF;
 *   the viewer and <streamhold-stream> use this, being for display.
 * @property {number} [idleMs]  A connection that brings nothing, not even a keep-alive, for this long is
 *   dropped and made again (default 60000; the server sends keep-alives every 15 s unless told otherwise).
 *
 * @typedef {object} FollowResult
 * @property {string} offset  The offset after the last chunk handed to onData.
 * @property {boolean} closed  Whether the stream was closed (false: stopped by the signal).
 */

/** The stream is gone (404, 410), or the server refused the read (400, 401, 403). */
export class StreamReadError extends Error {
  /** @param {number} status @param {string} message */
  constructor(status, message) {
    super(message);
    this.name = "StreamReadError";
    this.status = status;
  }
}

class Retry extends Error {}

const FATAL = [400, 401, 403, 404, 410];
// How a fatal answer ends following: the stream is gone, or the server will not let this reader read (no
// credential, or an altered or expired share link); a bad request (400) just stops.
const FINAL_STATES = { 401: "refused", 403: "refused", 404: "gone", 410: "gone" };
const IDLE_MS = 60000;
const RETRY_MIN_MS = 250;
const RETRY_MAX_MS = 5000;
const OFFSET = /^(\d+)_(\d+)$/;

/** Byte position of an offset token shaped like Streamhold's (`%016d_%016d`), or -1. */
function position(token) {
  const m = OFFSET.exec(token || "");
  return m ? Number(m[2]) : -1;
}

/** The token `n` bytes after `token`, in the same shape; "" when the token's shape is unknown. */
function advance(token, n) {
  const m = OFFSET.exec(token || "");
  return m ? `${m[1]}_${String(Number(m[2]) + n).padStart(m[2].length, "0")}` : "";
}

function base64Bytes(text) {
  const binary = atob(text.replace(/\s+/g, ""));
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

function concat(parts) {
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

// The parameters follow() sets on each read; every other one (a share link's `share`) rides along as given.
const READ_PARAMS = ["offset", "live", "cursor"];

// The viewer's page, `/watch/<name>` (a share link's `url`), names the stream as its protocol URL does. Only
// at the root: under a path prefix, `…/watch/stream/x` could as well be the content URL of stream `x`.
const VIEWER_PATH = /^\/watch\/(.+)$/;

/** `url` resolved against the page, without the read parameters; a viewer page's URL as its stream's. */
function readBase(url) {
  const u = new URL(String(url), globalThis.location ? location.href : undefined);
  for (const name of READ_PARAMS) u.searchParams.delete(name);
  const viewer = VIEWER_PATH.exec(u.pathname);
  if (viewer) {
    u.pathname = `/v1/stream/${viewer[1]}`;
    u.searchParams.delete("embed");
  }
  return u;
}

/**
 * Replay the stream at `url` from `options.offset`, then tail it until it closes or `signal` aborts.
 * Survives dropped connections, reloads of the server and restarts: it tracks the last offset it applied
 * and reconnects from there with backoff, so `onData` never sees a byte twice or misses one.
 * @param {string|URL} url  The stream's URL, `…/v1/stream/<name>`, `…/stream/{id}` or its viewer's
 *   `/watch/<name>`; its query (a share link's `share`) is kept on every read, only `offset`, `live` and
 *   `cursor` being set by follow().
 * @param {FollowOptions} [options]
 * @returns {Promise<FollowResult>}  Rejects with StreamReadError when the stream is gone or refused.
 */
export async function follow(url, options = {}) {
  const { onData = () => {}, onClose = () => {}, onState = () => {}, signal } = options;
  const maxRetries = options.maxRetries ?? 1000;
  const idleMs = options.idleMs ?? IDLE_MS;
  const exact = options.exact ?? true;
  let base = readBase(url);
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  let at = options.offset || "-1";
  let mode = options.live === "long-poll" ? "long-poll" : "sse";
  let jsonMode = false;
  let contentType = "";
  let cursor = "";
  let state = "";
  let failures = 0;
  let sseCut = 0;
  let wake = () => {};

  const setState = (next, detail) => {
    if (next === state) return;
    state = next;
    onState(next, detail);
  };
  const target = (params) => {
    const u = new URL(base);
    for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
    return u.href;
  };
  const stopped = () => Boolean(signal && signal.aborted);

  // Each connection has its own abort: the caller's signal, going offline, or a silent connection ends it.
  let current = new AbortController();
  let idleTimer = 0;
  const drop = () => current.abort();
  const touch = () => {
    clearTimeout(idleTimer);
    idleTimer = setTimeout(drop, idleMs);
  };
  signal?.addEventListener("abort", drop);
  globalThis.addEventListener?.("offline", drop);

  function deliver(bytes, next, messages) {
    const from = at;
    at = next;
    if (!bytes.length && !messages) return;
    const text = messages
      ? messages.map((m) => `${JSON.stringify(m)}\n`).join("")
      : decoder.decode(bytes, { stream: true });
    onData({ bytes, text, messages, from, offset: next, contentType });
  }

  async function open(params) {
    if (current.signal.aborted) current = new AbortController();
    touch();
    const response = await fetch(target(params), { cache: "no-store", signal: current.signal });
    // A /stream/{id} URL is sent on to the stream's protocol URL: read there from now on.
    if (response.redirected) base = readBase(response.url);
    if (FATAL.includes(response.status)) {
      let message = `the server answered ${response.status}`;
      try {
        message = (await response.json()).error || message;
      } catch (_) { /* not JSON */ }
      throw new StreamReadError(response.status, message);
    }
    if (!response.ok && response.status !== 204) throw new Retry(`the server answered ${response.status}`);
    failures = 0;
    const type = response.headers.get("content-type") || "";
    if (type && !type.startsWith("text/event-stream")) {
      contentType = type;
      jsonMode = type.split(";")[0].trim().toLowerCase() === "application/json";
    }
    return response;
  }

  /* A catch-up or long-poll body: handed on piece by piece as it arrives when offsets can be counted. */
  async function readBody(response) {
    const next = response.headers.get("stream-next-offset") || "";
    if (response.status === 204 || !response.body) {
      if (next) at = next;
      return;
    }
    if (jsonMode) {
      const bytes = new Uint8Array(await response.arrayBuffer());
      const text = new TextDecoder().decode(bytes);
      deliver(bytes, next || at, text.trim() ? JSON.parse(text) : []);
      return;
    }
    // Offsets count bytes: once the stream's token shape is known, hand each piece on as it arrives.
    if (at === "-1" && position(next) >= 0) at = advance(next, -position(next));
    const reader = response.body.getReader();
    const held = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      touch();
      const moved = advance(at, value.length);
      if (moved && position(at) >= 0 && !held.length) deliver(value, moved);
      else held.push(value);
    }
    if (held.length) deliver(concat(held), next || at);
    else if (next) at = next;
  }

  /* Plain GETs up to the tail: exact bytes, whatever the content type. */
  async function catchUp() {
    for (let round = 0; round < 100000; round++) {
      const response = await open({ offset: at });
      const before = at;
      await readBody(response);
      if (response.headers.get("stream-closed") === "true") return true;
      if (response.headers.get("stream-up-to-date") === "true" || at === before) return false;
    }
    return false;
  }

  async function longPoll() {
    for (;;) {
      const params = { offset: at, live: "long-poll" };
      if (cursor) params.cursor = cursor;
      const response = await open(params);
      cursor = response.headers.get("stream-cursor") || cursor;
      setState("live");
      await readBody(response);
      if (response.headers.get("stream-closed") === "true") return true;
    }
  }

  /* SSE read with fetch (headers and statuses visible, abortable). Returns true once the stream closed,
     false when the connection ended or its text lost bytes (a CR, a split character): the caller then
     reads the exact bytes with a catch-up. `events` counts what the connection carried. */
  async function sse(seen) {
    const response = await open({ offset: at, live: "sse" });
    if (!(response.headers.get("content-type") || "").startsWith("text/event-stream") || !response.body) {
      response.body?.cancel().catch(() => {});
      return false;
    }
    const binary = response.headers.get("stream-sse-data-encoding") === "base64";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let type = "";
    let data = [];
    let id = "";
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return false;
        touch();
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line === "") {
            if (type || data.length) {
              seen.events++;
              const outcome = await event(type || "message", data.join("\n"), id);
              if (outcome !== undefined) return outcome;
            }
            type = "";
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") type = text;
          else if (field === "data") data.push(text);
          else if (field === "id") id = text;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }

    async function event(kind, payload, next) {
      if (kind === "control") {
        const control = JSON.parse(payload);
        if (control.streamCursor) cursor = control.streamCursor;
        if (control.streamClosed && (!control.streamNextOffset || control.streamNextOffset === at)) return true;
        if (control.upToDate) setState("live");
        return undefined;
      }
      if (kind !== "data" || !next) return undefined;
      if (jsonMode) {
        deliver(encoder.encode(payload), next, JSON.parse(payload));
        return undefined;
      }
      let bytes = binary ? base64Bytes(payload) : encoder.encode(payload);
      const expected = position(next) - position(at);
      // SSE splits lines at CR, LF and CRLF alike, and a text event cannot carry half a character: when
      // the text has a line break, or its byte count is off, read those bytes exactly instead.
      if (!binary && position(at) >= 0 && (expected !== bytes.length || (exact && payload.includes("\n")))) {
        bytes = await readExact(expected);
        if (bytes.length !== expected) return false;
      }
      deliver(bytes, next);
      return undefined;
    }
  }

  /* The next `n` bytes from `at`, by a plain read cut short. */
  async function readExact(n) {
    const response = await open({ offset: at });
    const out = new Uint8Array(n);
    let got = 0;
    const reader = response.body ? response.body.getReader() : null;
    try {
      while (reader && got < n) {
        const { done, value } = await reader.read();
        if (done) break;
        const take = Math.min(value.length, n - got);
        out.set(value.subarray(0, take), got);
        got += take;
      }
    } finally {
      reader?.cancel().catch(() => {});
    }
    return out.subarray(0, got);
  }

  function pause() {
    const delay = Math.min(RETRY_MIN_MS * 2 ** Math.min(failures, 10), RETRY_MAX_MS) * (0.8 + Math.random() * 0.4);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", done);
        globalThis.removeEventListener?.("online", done);
        wake = () => {};
        resolve(undefined);
      };
      const timer = setTimeout(done, delay);
      wake = done;
      signal?.addEventListener("abort", done);
      globalThis.addEventListener?.("online", done);
    });
  }

  // A tab brought back to the front retries at once rather than at the end of a throttled timer.
  const onVisible = () => {
    if (globalThis.document?.visibilityState === "visible") wake();
  };
  // A page the browser freezes (a background tab) gets nothing more on a connection held across the
  // freeze: it lets the connection go as it freezes and reads again from its offset when it resumes.
  const onFreeze = () => drop();
  const onResume = () => {
    drop();
    wake();
  };
  globalThis.document?.addEventListener("visibilitychange", onVisible);
  globalThis.document?.addEventListener("freeze", onFreeze);
  globalThis.document?.addEventListener("resume", onResume);

  try {
    setState("connecting");
    while (!stopped()) {
      try {
        let closed = await catchUp();
        if (!closed) {
          if (mode === "sse") {
            const seen = { events: 0 };
            try {
              closed = await sse(seen);
            } finally {
              // Connections that end before their first event, while plain reads work, are being cut
              // on the way (a proxy that buffers or drops SSE): tail by long-poll from then on.
              sseCut = seen.events || stopped() ? 0 : sseCut + 1;
              if (sseCut >= 2) mode = "long-poll";
            }
          } else closed = await longPoll();
        }
        if (closed) {
          const rest = decoder.decode();
          if (rest) onData({ bytes: new Uint8Array(0), text: rest, from: at, offset: at, contentType });
          setState("closed");
          onClose(at);
          return { offset: at, closed: true };
        }
      } catch (error) {
        if (stopped()) break;
        if (error instanceof StreamReadError) {
          setState(FINAL_STATES[error.status] || "stopped", error.message);
          throw error;
        }
        if (error instanceof SyntaxError) throw error;
        failures++;
        if (failures > maxRetries) {
          setState("stopped", "gave up reconnecting");
          throw new Error(`could not reach the stream after ${maxRetries} attempts`);
        }
        const online = globalThis.navigator?.onLine !== false;
        setState("reconnecting", online ? String(error.message || error) : "offline");
        await pause();
      }
    }
  } finally {
    clearTimeout(idleTimer);
    signal?.removeEventListener("abort", drop);
    globalThis.removeEventListener?.("offline", drop);
    globalThis.document?.removeEventListener("visibilitychange", onVisible);
    globalThis.document?.removeEventListener("freeze", onFreeze);
    globalThis.document?.removeEventListener("resume", onResume);
  }
  setState("stopped");
  return { offset: at, closed: false };
}

/* ========================================== stop ========================================== */

const PROTOCOL_PATH = /^(.*?)\/v1\/stream\/(.+)$/;
const CONTENT_PATH = /^(.*?)\/stream\/([^/]+)\/?$/;

/**
 * Where to ask the writer of the stream at `src` to stop: `POST /stream/{id}/stop` on src's origin, src's
 * query kept (a share link's `share`; not the read parameters). A `/stream/{id}` URL names the id; for a
 * `/v1/stream/<name>` URL the server is asked (a HEAD names it in `Streamhold-Stream-Id`).
 * @param {string|URL} src
 * @param {{signal?: AbortSignal}} [options]
 * @returns {Promise<URL>}  Rejects with StreamReadError when the HEAD is refused or the stream is gone.
 */
export async function stopUrl(src, options = {}) {
  const url = readBase(src);
  const at = (prefix, id) => {
    const out = new URL(`${prefix}/stream/${encodeURIComponent(id)}/stop`, url);
    out.search = url.search;
    out.searchParams.delete("wait");
    return out;
  };
  let m = PROTOCOL_PATH.exec(url.pathname);
  if (m) {
    const response = await fetch(url, { method: "HEAD", cache: "no-store", signal: options.signal });
    if (!response.ok) throw new StreamReadError(response.status, `the server answered ${response.status}`);
    const id = response.headers.get("streamhold-stream-id");
    const name = decodeURIComponent(m[2]);
    if (!id && name.includes("/")) throw new Error("this server does not say how to stop its streams");
    return at(m[1], id || name);
  }
  m = CONTENT_PATH.exec(url.pathname);
  if (m) return at(m[1], decodeURIComponent(m[2]));
  throw new Error(`not a stream URL (…/v1/stream/<name> or …/stream/<id>): ${url.href}`);
}

// A refused read (an expired share link) would be a refused stop too.
const HIDDEN_STATES = ["closed", "gone", "refused"];

/**
 * Makes `button` the Stop button of the stream at `src`, as the viewer and <streamhold-stream stop> show it:
 * hidden until the server says this page may stop the stream (GET /stream/{id}/stop answers 200 for it
 * and the stream is open), hidden again once `root`'s `data-state` is closed, gone or refused. A press
 * POSTs the stop; a refusal shows beside the button. Options: `csrf` (the viewer's token), `signal` (stops
 * it all).
 * @param {HTMLButtonElement} button
 * @param {HTMLElement} root
 * @param {string|URL} src
 * @param {{csrf?: string, signal?: AbortSignal}} [options]
 */
export function stopControl(button, root, src, options = {}) {
  const { signal } = options;
  const headers = options.csrf ? { "x-csrf-token": options.csrf } : {};
  const label = button.textContent;
  const note = document.createElement("span");
  note.className = "streamhold-stop-note";
  note.setAttribute("role", "status");
  note.hidden = true;
  button.after(note);
  let url = null;
  let allowed = false;
  const sync = () => {
    const open = !HIDDEN_STATES.includes(root.dataset.state || "");
    button.hidden = !(allowed && open);
    if (!open) note.hidden = true;
  };
  const observer = new MutationObserver(sync);
  observer.observe(root, { attributes: true, attributeFilter: ["data-state"] });
  signal?.addEventListener("abort", () => {
    observer.disconnect();
    note.remove();
  });
  sync();

  const ask = async (method) => {
    const response = await fetch(url, { method, headers, credentials: "same-origin", cache: "no-store", signal });
    let answer = {};
    try {
      answer = await response.json();
    } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error(answer.error || `the server answered ${response.status}`);
    return answer;
  };

  (async () => {
    url = await stopUrl(src, { signal });
    const status = await ask("GET");
    allowed = !status.closed;
    sync();
  })().catch(() => { /* not this page's to stop (401, 403), or not from here: no button */ });

  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "Stopping…";
    note.hidden = true;
    try {
      await ask("POST");
      // The writer closes the stream when it stops; the stream's state then hides the button.
      button.title = "Asked the writer to stop";
    } catch (error) {
      if (signal?.aborted) return;
      button.disabled = false;
      button.textContent = label;
      note.textContent = `Could not stop the stream: ${error.message}`;
      note.hidden = false;
    }
  });
}

/* =================================== <streamhold-stream> =================================== */

const NOTES = {
  gone: "This stream was deleted or has expired. What you see is what had arrived before.",
  refused: "Could not read this stream",
  stopped: "Could not read this stream",
};

/**
 * `<streamhold-stream src="https://host/v1/stream/name">` shows a stream as the viewer does, and keeps
 * following it. Attributes: `src` (a `/v1/stream/<name>`, `/stream/{id}` or viewer `/watch/<name>` URL, its
 * query kept on every request); `format` ("auto" by the stream's type, or "markdown", "text", "csv", "json", "binary"); `follow`
 * ("false" shows what is there now and stops); `stop` (a Stop button while the stream is open, if this page
 * may stop it). It sets `data-state` (connecting, live, reconnecting, closed, gone, refused, stopped) and
 * fires `streamhold-state` and `streamhold-data`; refused (401, 403: no credential, an altered or expired
 * share link) and stopped show a note (`.streamhold-note`) with the server's reason.
 */
// Where there is no DOM (a worker, Node), follow() still imports; the element is then never defined.
const ElementBase = /** @type {typeof HTMLElement} */ (globalThis.HTMLElement ?? class {});

export class StreamholdStream extends ElementBase {
  static observedAttributes = ["src", "format", "follow", "stop"];

  /** @type {AbortController|null} */
  #controller = null;
  #text = "";
  #offset = "-1";
  #flushTimer = 0;

  /** Everything received so far, as text (the stream's bytes, not the rendered view). */
  get text() { return this.#text; }

  /** The offset after the last byte shown: where the stream would resume. */
  get offset() { return this.#offset; }

  connectedCallback() { this.#start(); }

  disconnectedCallback() { this.#stop(); }

  attributeChangedCallback() {
    if (this.isConnected) this.#start();
  }

  #stop() {
    if (this.#controller) this.#controller.abort();
    this.#controller = null;
    clearTimeout(this.#flushTimer);
  }

  #start() {
    this.#stop();
    this.#text = "";
    this.#offset = "-1";
    const src = this.getAttribute("src");
    const view = document.createElement("div");
    view.className = "streamhold-view";
    this.replaceChildren(view);
    if (!src) return;
    const controller = new AbortController();
    this.#controller = controller;
    if (this.hasAttribute("stop")) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "streamhold-stop";
      button.title = "Ask the stream's writer to stop";
      button.textContent = "■ Stop";
      this.prepend(button);
      stopControl(button, this, src, { signal: controller.signal });
    }
    const format = (this.getAttribute("format") || "auto").toLowerCase();
    const live = this.getAttribute("follow") !== "false";
    /** @type {Renderer|null} */
    let renderer = null;
    const show = (state, detail, note = true) => {
      this.dataset.state = state;
      this.dispatchEvent(new CustomEvent("streamhold-state", { detail: { state, detail } }));
      if (note && NOTES[state]) {
        const note = document.createElement("p");
        note.className = "streamhold-note";
        note.textContent = state === "gone" ? NOTES.gone : `${NOTES[state]}: ${detail || "unknown error"}`;
        this.append(note);
      }
    };
    follow(src, {
      signal: controller.signal,
      exact: false,
      onState: (state, detail) => {
        if (controller.signal.aborted) return;
        if (state === "live" && !live) {  // up to date, and not asked to follow: stop here
          renderer?.finish();
          controller.abort();
          show("stopped", "not following", false);
          return;
        }
        show(state, detail);
      },
      onData: (chunk) => {
        if (!renderer) {
          const kind = format === "auto" ? viewKind(chunk.contentType || "") : format;
          renderer = createRenderer(kind, view, { preview: 1024, tsv: /tab-separated/.test(chunk.contentType || "") });
          renderer.reset("", { lineStart: true, atStreamStart: chunk.from === "-1" || position(chunk.from) === 0 });
        }
        this.#text += chunk.text;
        this.#offset = chunk.offset;
        if (renderer.bytes) renderer.bytes(chunk.bytes);
        else renderer.append(chunk.text);
        clearTimeout(this.#flushTimer);
        // Frames do not run in a hidden tab; the view still keeps up.
        this.#flushTimer = setTimeout(() => renderer?.flush(), 100);
        this.dispatchEvent(new CustomEvent("streamhold-data", { detail: chunk }));
      },
      onClose: () => renderer?.finish(),
    }).catch(() => { /* the state and its note say what happened */ });
  }
}

if (globalThis.customElements && !customElements.get("streamhold-stream")) {
  customElements.define("streamhold-stream", StreamholdStream);
}
