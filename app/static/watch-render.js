/* Streamhold viewer renderers: turn the growing text of a stream into DOM. Content only ever becomes text
   nodes and a fixed set of elements (never innerHTML), and links keep to http(s) and mailto. */
(() => {
  "use strict";

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
    const table = host.querySelector("#hex");
    const caption = host.querySelector("#hex-caption");
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

  const noop = { reset() {}, append() {}, flush() {}, finish() {} };

  window.StreamholdRender = {
    create(kind, host, options) {
      if (kind === "markdown") return markdownView(host);
      if (kind === "csv") return csvView(host, options);
      if (kind === "json") return jsonView(host);
      if (kind === "binary") return binaryView(host, options);
      return noop;
    },
  };
})();
