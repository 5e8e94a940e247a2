// AnyWork web UI: sessions, streaming chat over /ws with resume after reconnect, tool cards,
// input prompts and the SOUL.md / AGENTS.md editor. Plain ES2020, no framework, no build step.
"use strict";
(() => {
const $ = (s, root = document) => root.querySelector(s);
const TERMINAL = new Set(["completed", "failed", "canceled"]);
const THEME_KEY = "anywork-theme";

const S = {
  ws: null, wsOpen: false, backoff: 500, retry: null, ping: null, everOpen: false,
  sessions: [], moreSessions: false, current: null,
  view: 0,               // bumped whenever the chat panel is reset
  tasks: new Map(),      // task_id -> task view of the open session
  pending: [],           // chats sent (or queued until the socket opens), waiting for task_created
  loading: -1,           // view whose history is being fetched
  refreshTimer: null,
  search: "",            // sidebar search (titles)
  searchRows: null,      // the server's answer to the search (null: none yet)
  searchMore: false, searchSeq: 0, searchTimer: null,
  total: null, totalTimer: null, // cost and tokens of all sessions (GET /api/usage)
  usage: null,           // cost and tokens of the open session
};

// ---- small helpers
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
const unescapeHtml = (s) => s.replace(/&(amp|lt|gt|quot|#39);/g, (_, e) =>
  ({ amp: "&", lt: "<", gt: ">", quot: '"', "#39": "'" }[e]));

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

// A <button type="button"> with an optional click handler.
function button(cls, text, onClick) {
  const b = el("button", cls, text);
  b.type = "button";
  if (onClick) b.addEventListener("click", onClick);
  return b;
}

function toast(msg, kind = "error") {
  const t = el("div", "toast " + kind, msg);
  $("#toasts").appendChild(t);
  setTimeout(() => t.classList.add("out"), 4500);
  setTimeout(() => t.remove(), 5000);
}

// ---- API token (ANYWORK_API_TOKEN): asked for once on a 401, kept in localStorage.
const TOKEN_KEY = "anywork.apiToken";
function apiToken() {
  try { return localStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; }
}
let tokenAsk = null;
function askToken() {
  // One prompt for all the requests that were refused together.
  if (!tokenAsk) {
    tokenAsk = Promise.resolve().then(() => {
      const t = (window.prompt("This AnyWork server needs its API token (ANYWORK_API_TOKEN):") || "").trim();
      try { if (t) localStorage.setItem(TOKEN_KEY, t); else localStorage.removeItem(TOKEN_KEY); } catch (_) { /* private mode */ }
      // The WebSocket reconnects carrying the new token.
      if (t && S.ws) { try { S.ws.close(); } catch (_) { /* already closed */ } }
      setTimeout(() => { tokenAsk = null; }, 0);
      return t;
    });
  }
  return tokenAsk;
}

async function api(method, path, body, retried) {
  const opts = { method, headers: { accept: "application/json" } };
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const token = apiToken();
  if (token) opts.headers.authorization = "Bearer " + token;
  let r;
  try { r = await fetch(path, opts); } catch (e) { throw new Error("Network error: " + e.message); }
  if (r.status === 401 && !retried) {
    if (await askToken()) return api(method, path, body, true);
  }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data && data.error && data.error.message) || r.status + " " + r.statusText);
  return data;
}

async function copyText(text, btn) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); ok = true; }
  } catch (_) { /* fall back below */ }
  if (!ok) {
    const ta = el("textarea");
    ta.value = text;
    ta.style.cssText = "position:fixed;opacity:0;top:0;left:0";
    document.body.appendChild(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
  }
  if (btn) {
    const old = btn.textContent;
    btn.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { btn.textContent = old; }, 1400);
  }
}

function relTime(secs) {
  const d = Date.now() / 1000 - secs;
  if (d < 60) return "now";
  if (d < 3600) return Math.floor(d / 60) + "m";
  if (d < 86400) return Math.floor(d / 3600) + "h";
  if (d < 86400 * 7) return Math.floor(d / 86400) + "d";
  return new Date(secs * 1000).toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

// ---- markdown
// Everything is HTML-escaped first; only a small set of constructs becomes markup afterwards.
const FENCE_RE = /^(\s*)(`{3,}|~{3,})\s*([\w+#.-]*)/;
const LIST_RE = /^(\s*)([-*+]|\d{1,9}[.)])(\s+)(.*)$/;
const HR_RE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const HEAD_RE = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const QUOTE_RE = /^\s{0,3}&gt;\s?(.*)$/;
const TABLE_SEP_RE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function markdown(src) {
  const text = String(src == null ? "" : src).replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
  const lines = escapeHtml(text).split("\n");
  try { return blocks(lines, 0); } catch (_) { return "<p>" + lines.join("<br>") + "</p>"; }
}

function isBlockStart(lines, i) {
  const l = lines[i];
  return FENCE_RE.test(l) || HEAD_RE.test(l) || HR_RE.test(l) || QUOTE_RE.test(l) || LIST_RE.test(l) || isTable(lines, i);
}

function isTable(lines, i) {
  return i + 1 < lines.length && lines[i].includes("|") && lines[i + 1].includes("|") && TABLE_SEP_RE.test(lines[i + 1]);
}

function blocks(lines, depth) {
  if (depth > 10) return "<p>" + lines.filter((l) => l.trim()).map((l) => inline(l.trim())).join("<br>") + "</p>";
  const out = [];
  let i = 0, m;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    if ((m = line.match(FENCE_RE))) {
      const indent = m[1].length, fence = m[2], code = [];
      const close = new RegExp("^\\s*" + fence[0] + "{" + fence.length + ",}\\s*$");
      i++;
      while (i < lines.length && !close.test(lines[i])) {
        const l = lines[i++];
        const lead = l.match(/^ */)[0].length;
        code.push(l.slice(Math.min(lead, indent)));
      }
      i++;
      out.push(codeBlock(code.join("\n"), m[3]));
      continue;
    }
    if ((m = line.match(HEAD_RE))) {
      const n = m[1].length;
      out.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">");
      i++;
      continue;
    }
    if (HR_RE.test(line)) { out.push("<hr>"); i++; continue; }
    if (QUOTE_RE.test(line)) {
      const q = [];
      while (i < lines.length && (m = lines[i].match(QUOTE_RE))) { q.push(m[1]); i++; }
      out.push("<blockquote>" + blocks(q, depth + 1) + "</blockquote>");
      continue;
    }
    if (LIST_RE.test(line)) {
      const [html, next] = list(lines, i, depth);
      out.push(html);
      i = next;
      continue;
    }
    if (isTable(lines, i)) {
      const [html, next] = table(lines, i);
      out.push(html);
      i = next;
      continue;
    }
    const para = [line.trim()];
    i++;
    while (i < lines.length && lines[i].trim() && !isBlockStart(lines, i)) para.push(lines[i++].trim());
    out.push("<p>" + para.map(inline).join("<br>") + "</p>");
  }
  return out.join("");
}

function list(lines, i, depth) {
  const first = lines[i].match(LIST_RE);
  const base = first[1].length;
  const ordered = /\d/.test(first[2]);
  const items = [];
  let cur = null;
  while (i < lines.length) {
    const l = lines[i];
    const m = l.match(LIST_RE);
    if (m && m[1].length <= base + 1) {
      if (/\d/.test(m[2]) !== ordered) break;
      cur = { body: [m[4]], ci: m[1].length + m[2].length + m[3].length };
      items.push(cur);
      i++;
      continue;
    }
    const lead = l.match(/^\s*/)[0].length;
    if (!l.trim()) {
      let j = i + 1;
      while (j < lines.length && !lines[j].trim()) j++;
      if (j >= lines.length) { i = j; break; }
      const mm = lines[j].match(LIST_RE);
      const sibling = mm && mm[1].length <= base + 1 && /\d/.test(mm[2]) === ordered;
      if (sibling || lines[j].match(/^\s*/)[0].length > base) { cur.body.push(""); i = j; continue; }
      break;
    }
    if (lead > base) { cur.body.push(l.slice(Math.min(lead, cur.ci))); i++; continue; }
    if (cur.body[cur.body.length - 1] !== "" && !isBlockStart(lines, i)) { cur.body.push(l.trim()); i++; continue; }
    break;
  }
  const tag = ordered ? "ol" : "ul";
  const start = ordered ? parseInt(first[2], 10) : 1;
  const open = "<" + tag + (ordered && start !== 1 ? ' start="' + start + '"' : "") + ">";
  const body = items.map((it) => {
    const loose = it.body.some((b, k) => b === "" && k < it.body.length - 1);
    let html = blocks(it.body, depth + 1);
    if (!loose) html = html.replace(/^<p>([\s\S]*?)<\/p>/, "$1");
    return "<li>" + html + "</li>";
  }).join("");
  return [open + body + "</" + tag + ">", i];
}

function table(lines, i) {
  const cells = (l) => l.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  const head = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
  const cell = (tag, c, k) => "<" + tag + (aligns[k] ? ' style="text-align:' + aligns[k] + '"' : "") + ">" + inline(c) + "</" + tag + ">";
  let html = '<div class="table-wrap"><table><thead><tr>' + head.map((c, k) => cell("th", c, k)).join("") + "</tr></thead><tbody>";
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = cells(lines[i++]);
    html += "<tr>" + head.map((_, k) => cell("td", row[k] || "", k)).join("") + "</tr>";
  }
  return [html + "</tbody></table></div>", i];
}

function codeBlock(code, lang) {
  const l = lang ? escapeHtml(lang) : "";
  return '<div class="code-block"><div class="code-head"><span>' + (l || "code") +
    '</span><button class="copy" type="button">Copy</button></div><pre><code' +
    (l ? ' class="language-' + l + '"' : "") + ">" + code + "</code></pre></div>";
}

// `s` is already escaped. Code spans and links are set aside as placeholders first so that
// emphasis never reaches into them.
function inline(s) {
  const held = [];
  const hold = (html) => "\u0000" + (held.push(html) - 1) + "\u0000";
  s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, __, c) => hold("<code>" + c.trim() + "</code>"));
  s = s.replace(/\[([^\]]+)\]\(\s*([^)\s]+)\s*\)/g, (m, text, url) => {
    if (!/^(https?:\/\/|mailto:)/i.test(unescapeHtml(url))) return m;
    return hold('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + emphasis(text) + "</a>");
  });
  s = s.replace(/\bhttps?:\/\/(?:(?!&quot;|&#39;|&lt;|&gt;|\u0000)\S)+/g, (url) => {
    const trail = url.match(/(?:[.,:;!?)\]]|&amp;)+$/);
    const tail = trail ? trail[0] : "";
    const u = url.slice(0, url.length - tail.length);
    return hold('<a href="' + u + '" target="_blank" rel="noopener noreferrer">' + u + "</a>") + tail;
  });
  s = emphasis(s);
  for (let k = 0; k < 3 && s.includes("\u0000"); k++) s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => held[+n]);
  return s;
}

function emphasis(s) {
  return s
    .replace(/\*\*\*(?=\S)([^*]*?\S)\*\*\*/g, "<strong><em>$1</em></strong>")
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^\w*])\*(?=[^\s*])([^*]*?[^\s*])\*(?![\w*])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([^~]*?\S)~~/g, "<del>$1</del>");
}

// ---- sidebar
async function loadSessions(append = false) {
  const offset = append ? S.sessions.length : 0;
  const data = await api("GET", "/api/sessions?limit=50&offset=" + offset);
  const rows = data.sessions || [];
  if (append) {
    const known = new Set(S.sessions.map((s) => s.id));
    S.sessions.push(...rows.filter((r) => !known.has(r.id)));
  } else {
    // Keep rows this page knows of but the server does not list yet (just created).
    const ids = new Set(rows.map((r) => r.id));
    const keep = S.sessions.filter((s) => s.local && !ids.has(s.id));
    S.sessions = keep.concat(rows);
  }
  S.moreSessions = rows.length === 50;
  renderSidebar();
}

// Search by title on the server (debounced), so that sessions not loaded yet are found; the
// loaded ones are filtered at once meanwhile.
function onSearchInput(value) {
  S.search = value;
  clearTimeout(S.searchTimer);
  S.searchSeq++;
  S.searchRows = null;
  renderSidebar();
  if (!value.trim()) return;
  S.searchTimer = setTimeout(() => searchSessions(false).catch((e) => toast(e.message)), 250);
}

async function searchSessions(append) {
  const q = S.search.trim();
  if (!q) return;
  const seq = ++S.searchSeq;
  const offset = append && S.searchRows ? S.searchRows.length : 0;
  const data = await api("GET", "/api/sessions?limit=50&offset=" + offset + "&q=" + encodeURIComponent(q));
  if (seq !== S.searchSeq) return; // the text changed meanwhile
  const rows = data.sessions || [];
  if (append && S.searchRows) {
    const known = new Set(S.searchRows.map((r) => r.id));
    S.searchRows.push(...rows.filter((r) => !known.has(r.id)));
  } else S.searchRows = rows;
  S.searchMore = rows.length === 50;
  renderSidebar();
}

// ---- total cost and tokens of all conversations (sidebar), from the server
async function loadTotal() {
  S.total = await api("GET", "/api/usage");
  showTotal();
}

function loadTotalSoon() {
  clearTimeout(S.totalTimer);
  S.totalTimer = setTimeout(() => loadTotal().catch(() => {}), 300);
}

const tokenCount = (n) => (n >= 1000 ? (n / 1000).toFixed(1) + "k" : String(n));

function showTotal() {
  const t = S.total;
  const box = $("#usage-total");
  if (!t || !t.tasks) { box.textContent = ""; box.hidden = true; return; }
  const u = t.usage || {};
  const input = Number(u.input_tokens || 0), output = Number(u.output_tokens || 0);
  const cost = Number(t.costUsd || 0);
  box.hidden = false;
  box.textContent = "Total $" + cost.toFixed(4) + " · " + tokenCount(input + output) + " tokens";
  box.title = "All " + t.sessions + " conversations (" + t.tasks + " tasks): $" + cost.toFixed(6) + ", " + input + " input and " + output + " output tokens";
}

function refreshSessionsSoon() {
  clearTimeout(S.refreshTimer);
  S.refreshTimer = setTimeout(() => loadSessions().catch(() => {}), 400);
}

function groupOf(secs) {
  const now = new Date();
  const today = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime() / 1000;
  if (secs >= today) return "Today";
  if (secs >= today - 86400) return "Yesterday";
  if (secs >= today - 86400 * 7) return "Previous 7 days";
  return "Older";
}

function renderSidebar() {
  const nav = $("#session-list");
  nav.textContent = "";
  if (!S.sessions.length) {
    nav.appendChild(el("div", "side-empty", "No conversations yet"));
    return;
  }
  let group = null;
  const q = (S.search || "").trim().toLowerCase();
  let shown = S.sessions, more = S.moreSessions;
  if (q && S.searchRows) {
    // The server's rows, with what this page knows live (running, a new title) on top.
    shown = S.searchRows.map((r) => findSession(r.id) || r);
    more = S.searchMore;
  } else if (q) {
    shown = S.sessions.filter((s) => (s.title || "").toLowerCase().includes(q));
    more = false;
  }
  nav.dataset.search = q ? (S.searchRows ? "server" : "local") : "";
  if (!shown.length) nav.appendChild(el("div", "side-empty", "No conversation matches “" + S.search.trim() + "”"));
  for (const s of shown) {
    const g = groupOf(s.last_active || s.created_at || 0);
    if (g !== group) { group = g; nav.appendChild(el("div", "side-group", g)); }
    const item = el("div", "session-item" + (s.id === S.current ? " active" : ""));
    item.dataset.sessionId = s.id;
    item.tabIndex = 0;
    item.setAttribute("role", "button");
    const title = el("span", "session-title", s.title || "Untitled");
    item.title = s.title || "";
    item.appendChild(title);
    if (s.active_task_count > 0 || s.running) item.appendChild(el("span", "session-live", ""));
    else item.appendChild(el("span", "session-time", relTime(s.last_active || s.created_at || 0)));
    const del = button("session-delete");
    del.title = "Delete conversation";
    del.setAttribute("aria-label", "Delete conversation");
    del.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 7h14M10 11v6M14 11v6M6 7l1 12h10l1-12M9 7V4h6v3"/></svg>';
    item.appendChild(del);
    nav.appendChild(item);
  }
  if (more) {
    const next = q ? () => searchSessions(true) : () => loadSessions(true);
    nav.appendChild(button("side-more", "Show more", () => next().catch((e) => toast(e.message))));
  }
}

function findSession(id) { return S.sessions.find((s) => s.id === id); }

function touchSession(id, patch) {
  if (!id) return;
  const s = findSession(id);
  if (!s) { refreshSessionsSoon(); return; }
  Object.assign(s, patch || {});
  s.last_active = Math.floor(Date.now() / 1000);
  const idx = S.sessions.indexOf(s);
  if (idx > 0) { S.sessions.splice(idx, 1); S.sessions.unshift(s); }
  renderSidebar();
}

function setSessionTitle(id, title) {
  const s = findSession(id);
  if (s) { s.title = title; renderSidebar(); } else refreshSessionsSoon();
  if (id === S.current) setHeader(title);
}

function setHeader(title) {
  $("#chat-title").textContent = title || "New chat";
  document.title = title && S.current ? title + " · AnyWork" : "AnyWork";
  filesFollowSession();
}

async function deleteSession(id) {
  const s = findSession(id);
  if (!confirm('Delete "' + ((s && s.title) || "this conversation") + '"? This cannot be undone.')) return;
  try {
    await api("DELETE", "/api/sessions/" + encodeURIComponent(id));
  } catch (e) { toast(e.message); return; }
  S.sessions = S.sessions.filter((x) => x.id !== id);
  if (S.searchRows) S.searchRows = S.searchRows.filter((x) => x.id !== id);
  loadTotalSoon();
  if (S.current === id) newChat();
  else renderSidebar();
}

// ---- chat panel
const messages = () => $("#messages");

function nearBottom() {
  const m = messages();
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}
function scrollBottom(force, wasNear) {
  const m = messages();
  if (force || wasNear) m.scrollTop = m.scrollHeight;
}

function resetPanel() {
  S.view++;
  S.tasks = new Map();
  const m = messages();
  m.textContent = "";
  removePromptBox();
  updateCancel();
}

function showEmpty() {
  const m = messages();
  if (m.querySelector(".msg")) return;
  m.textContent = "";
  const box = el("div", "empty");
  box.appendChild(el("div", "empty-logo"));
  box.appendChild(el("h2", null, "How can I help?"));
  box.appendChild(el("p", "muted", "Ask anything. The agent can use tools, read and write files in its workspace, and ask you when it needs a decision."));
  m.appendChild(box);
}

function clearEmpty() {
  const e = $("#messages .empty");
  if (e) e.remove();
}

function newChat() {
  S.current = null;
  setRoute(null);
  showUsage();
  resetPanel();
  setHeader(null);
  renderSidebar();
  showEmpty();
  closeSidebar();
  $("#message-input").focus();
}

function addUserBubble(text) {
  const msg = el("div", "msg user");
  msg.appendChild(el("div", "bubble", text));
  messages().appendChild(msg);
  return msg;
}

function newTaskView(id) {
  const msg = el("div", "msg assistant");
  if (id) msg.dataset.taskId = id;
  const body = el("div", "body");
  const working = el("div", "working");
  working.innerHTML = "<i></i><i></i><i></i>";
  working.appendChild(el("span", "working-label"));
  const footer = el("div", "msg-footer");
  footer.hidden = true;
  body.append(el("div", "blocks"), working, footer);
  msg.appendChild(body);
  messages().appendChild(msg);
  const t = {
    id, el: msg, blocks: body.firstChild, working, footer, lastSeq: 0, status: "pending",
    finished: false, seg: null, segText: "", answer: "", hasText: false, tools: new Map(),
    usage: null, prompt: null, notices: [], progress: null,
  };
  if (id) S.tasks.set(id, t);
  updateIndicator(t);
  return t;
}

function bindTask(t, id) {
  t.id = id;
  t.el.dataset.taskId = id;
  S.tasks.set(id, t);
}

function updateIndicator(t) {
  const show = !t.finished && !(t.seg && t.lastType === "text") && !t.prompt;
  t.working.hidden = !show;
  const label = !t.id && !S.wsOpen ? "Connecting…" : t.status === "pending" ? "Waiting for a worker…" : "";
  showProgress(t, label);
}

// ---- progress: what a task waits for (a worker being made ready, a model call retried)
// The last `progress` event stands in the working indicator until any other event comes.
function setProgress(t, content, md) {
  t.progress = { text: content || "Working…", stage: md.stage || "", reason: md.reason || "" };
}

function showProgress(t, fallback) {
  const label = t.working.lastChild;
  const p = !t.finished && t.progress;
  label.classList.toggle("progress", !!p);
  label.classList.toggle("retry", !!(p && p.reason));
  t.working.dataset.stage = p ? p.stage : "";
  label.textContent = p ? clip(p.text, 400) : fallback;
  label.title = p ? p.text : "";
}

function addBlock(t, node) {
  t.blocks.appendChild(node);
  t.seg = null;
}

function addText(t, text) {
  if (!text) return;
  if (!t.seg) {
    t.seg = el("div", "content md");
    t.segText = "";
    t.blocks.appendChild(t.seg);
  }
  t.segText += text;
  t.answer += text;
  t.hasText = true;
  t.seg.innerHTML = markdown(t.segText);
}

function addThinking(t, text) {
  const last = t.blocks.lastElementChild;
  if (last && last.classList.contains("thinking") && t.lastType === "thinking") {
    last._text += text;
    last.lastChild.textContent = last._text;
    return;
  }
  const d = el("details", "thinking");
  d.appendChild(el("summary", null, "Thinking"));
  d._text = text;
  d.appendChild(el("div", "thinking-body", text));
  addBlock(t, d);
}

function previewOf(input) {
  if (input == null) return "";
  if (typeof input !== "object") return String(input);
  for (const k of ["command", "file_path", "path", "pattern", "url", "query", "question", "description", "prompt", "name"]) {
    if (typeof input[k] === "string" && input[k]) return input[k];
  }
  const s = JSON.stringify(input);
  return s === "{}" ? "" : s;
}
const pretty = (v) => { try { return typeof v === "string" ? v : JSON.stringify(v, null, 2); } catch (_) { return String(v); } };
const clip = (s, n) => (s.length > n ? s.slice(0, n) + "\n… (" + (s.length - n) + " more characters)" : s);

function toolCard(name, input) {
  const d = el("details", "tool-call pending");
  const sum = el("summary");
  sum.appendChild(el("span", "tool-state"));
  sum.appendChild(el("span", "tool-name", name || "tool"));
  const p = previewOf(input).replace(/\s+/g, " ").trim();
  if (p) sum.appendChild(el("span", "tool-preview", p.length > 90 ? p.slice(0, 90) + "…" : p));
  d.appendChild(sum);
  const body = el("div", "tool-body");
  if (input !== undefined && input !== null && !(typeof input === "object" && !Object.keys(input).length)) {
    body.appendChild(el("div", "tool-label", "Input"));
    body.appendChild(el("pre", "tool-input", clip(pretty(input), 20000)));
  }
  d.appendChild(body);
  return d;
}

function addToolCall(t, name, md) {
  const d = toolCard(name, md.input);
  if (md.id) t.tools.set(md.id, d);
  addBlock(t, d);
}

function addToolResult(t, content, md) {
  let d = md.tool_use_id && t.tools.get(md.tool_use_id);
  if (!d) { d = toolCard("Tool result"); addBlock(t, d); }
  d.classList.remove("pending");
  d.classList.add(md.is_error ? "error" : "ok");
  const body = d.lastChild;
  body.appendChild(el("div", "tool-label", md.is_error ? "Error" : "Output"));
  body.appendChild(el("pre", "tool-output", content ? clip(content, 30000) : "(no output)"));
  t.seg = null;
}

function addInit(t, model, md) {
  if (t.blocks.querySelector(".init-line")) return;
  const n = Array.isArray(md.tools) ? md.tools.length : 0;
  const parts = [model || "model"];
  if (n) parts.push(n + (n === 1 ? " tool" : " tools"));
  if (Array.isArray(md.skills) && md.skills.length) parts.push(md.skills.length + " skills");
  const line = el("div", "init-line", parts.join(" · "));
  if (n) line.title = md.tools.join(", ");
  t.blocks.insertBefore(line, t.blocks.firstChild);
}

function addNotice(t, text, kind) {
  if (kind === "error" && t.notices.includes(text)) return;
  t.notices.push(text);
  addBlock(t, el("div", "notice " + kind, text));
}

function finish(t, content, md) {
  removePrompt(t, null);
  const status = md.status || "completed";
  t.finished = true;
  t.status = status;
  if (!t.hasText && content && status !== "canceled") addText(t, content);
  if (status === "failed") addNotice(t, md.error || "The task failed.", "error");
  if (status === "canceled") addNotice(t, "Canceled", "muted");
  renderFooter(t, md);
  t.el.dataset.status = status;
  updateIndicator(t);
  updateCancel();
  if (!S.loading || S.loading !== S.view) filesFollowSession();
}

function renderFooter(t, md) {
  const f = t.footer;
  f.textContent = "";
  const usage = md.usage || (t.usage && t.usage.usage) || {};
  const cost = md.cost_usd != null ? md.cost_usd : t.usage && t.usage.cost_usd;
  const parts = [];
  if (md.num_turns) parts.push(md.num_turns + (md.num_turns === 1 ? " turn" : " turns"));
  if (md.duration_ms) parts.push((md.duration_ms / 1000).toFixed(1) + "s");
  if (cost != null && cost > 0) parts.push("$" + Number(cost).toFixed(4));
  const info = el("span", "footer-info", parts.join(" · "));
  const tok = [];
  if (usage.input_tokens) tok.push(usage.input_tokens + " input tokens");
  if (usage.output_tokens) tok.push(usage.output_tokens + " output tokens");
  if (tok.length) info.title = tok.join(", ");
  f.appendChild(info);
  if (t.answer) {
    const b = button("footer-copy", "Copy", () => copyText(t.answer, b));
    b.title = "Copy the answer as markdown";
    f.appendChild(b);
  }
  f.hidden = false;
}

// ---- input prompts
function removePromptBox() {
  const old = $("#input-prompt");
  if (old) old.removeAttribute("id");
}

function showPrompt(t, text, md) {
  removePrompt(t, null);
  for (const other of S.tasks.values()) if (other !== t && other.prompt) removePrompt(other, null);
  const box = el("div", "input-prompt");
  box.id = "input-prompt";
  const perm = md.kind === "permission";
  box.appendChild(el("div", "prompt-kind", perm ? "Permission needed" : "The agent asks"));
  const q = el("div", "prompt-text md");
  q.innerHTML = markdown(text || (perm ? "Allow this tool to run?" : ""));
  box.appendChild(q);
  const answer = (ans, allow) => respond(t, md.request_id, ans, allow);
  if (perm) {
    if (md.tool_name) box.appendChild(el("div", "prompt-tool", md.tool_name));
    if (md.input !== undefined && md.input !== null) box.appendChild(el("pre", "prompt-input", clip(pretty(md.input), 8000)));
    const row = el("div", "prompt-actions");
    const allow = button("btn primary", "Allow", () => answer("", true));
    allow.id = "input-allow";
    const deny = button("btn", "Deny", () => answer("", false));
    deny.id = "input-deny";
    row.append(allow, deny);
    box.appendChild(row);
  } else {
    if (Array.isArray(md.options) && md.options.length) {
      const opts = el("div", "prompt-options");
      for (const o of md.options) {
        opts.appendChild(button("chip", o, () => answer(o)));
      }
      box.appendChild(opts);
    }
    const row = el("form", "prompt-actions");
    const input = el("input", "prompt-field");
    input.id = "input-answer";
    input.placeholder = "Your answer…";
    input.autocomplete = "off";
    const send = el("button", "btn primary", "Send");
    send.id = "input-send";
    send.type = "submit";
    row.addEventListener("submit", (e) => {
      e.preventDefault();
      if (input.value.trim()) answer(input.value.trim());
    });
    row.append(input, send);
    box.appendChild(row);
  }
  t.prompt = { box, md, text };
  addBlock(t, box);
  updateIndicator(t);
  return box;
}

// Replaces the live prompt box with a muted record of what was asked / answered.
function removePrompt(t, record) {
  if (!t.prompt) return;
  const { box, md, text } = t.prompt;
  t.prompt = null;
  const rec = el("div", "prompt-record");
  const what = md.kind === "permission" ? "Permission asked for " + (md.tool_name || "a tool") : "Asked: " + (text || "");
  const w = el("span");
  w.innerHTML = inline(escapeHtml(what.replace(/\s+/g, " ")));
  rec.appendChild(w);
  if (record) rec.appendChild(el("span", "prompt-answer", record));
  box.replaceWith(rec);
  updateIndicator(t);
}

async function respond(t, requestId, answer, allow) {
  const msg = { type: "input_response", task_id: t.id, request_id: requestId, answer };
  if (allow !== undefined) msg.allow = allow;
  const record = allow === undefined ? "You answered: " + answer : allow ? "Allowed" : "Denied";
  if (S.wsOpen) {
    S.ws.send(JSON.stringify(msg));
  } else {
    const body = { request_id: requestId, answer };
    if (allow !== undefined) body.allow = allow;
    try { await api("POST", "/api/tasks/" + encodeURIComponent(t.id) + "/input", body); } catch (e) { toast(e.message); return; }
  }
  removePrompt(t, record);
}

// ---- task events
const SUPERSEDES_PROMPT = new Set(["text", "thinking", "tool_call", "tool_result", "done"]);

function applyEvent(t, ev) {
  if (ev.seq != null) {
    if (ev.seq <= t.lastSeq) return;
    t.lastSeq = ev.seq;
  }
  const md = ev.metadata && typeof ev.metadata === "object" ? ev.metadata : {};
  const content = ev.content == null ? "" : String(ev.content);
  if (t.finished && ev.type !== "error") return;
  if (ev.type !== "progress" && ev.type !== "usage") t.progress = null;
  if (t.prompt && (SUPERSEDES_PROMPT.has(ev.type) || (ev.type === "status" && content === "running"))) removePrompt(t, null);
  switch (ev.type) {
    case "init": addInit(t, content, md); break;
    case "text": addText(t, content); break;
    case "thinking": addThinking(t, content); break;
    case "tool_call": addToolCall(t, content, md); break;
    case "tool_result": addToolResult(t, content, md); break;
    case "input_required": showPrompt(t, content, md); break;
    case "usage": t.usage = md; break;
    case "progress": setProgress(t, content, md); break;
    case "status": if (!TERMINAL.has(content)) t.status = content; break;
    case "error": addNotice(t, content || "Error", "error"); break;
    case "done": finish(t, content, md); break;
    default: break;
  }
  if (ev.type !== "usage" && ev.type !== "status") t.lastType = ev.type;
  if (!t.finished && ["init", "text", "thinking", "tool_call", "tool_result"].includes(ev.type)) t.status = "running";
  updateIndicator(t);
}

function onMessage(m) {
  switch (m.type) {
    case "pong": return;
    case "session_created": onSessionCreated(m); return;
    case "task_created": onTaskCreated(m); return;
    case "session_title": setSessionTitle(m.session_id, m.content || ""); return;
    default: break;
  }
  if (!m.task_id) {
    if (m.type === "error") {
      const p = S.pending.shift();
      if (p && p.view === S.view) {
        addNotice(p.t, m.content || "The message was not accepted.", "error");
        p.t.finished = true;
        p.t.el.dataset.status = "failed";
        updateIndicator(p.t);
      }
      toast(m.content || "Error");
    }
    return;
  }
  if (m.type === "done") { touchSession(m.session_id, { running: false, active_task_count: 0 }); loadTotalSoon(); }
  if (m.type === "done" && m.session_id === S.current && S.tasks.has(m.task_id) && !S.tasks.get(m.task_id).finished) addUsage(m.metadata || {});
  if (m.session_id && m.session_id !== S.current) return;
  const t = S.tasks.get(m.task_id);
  if (!t) return; // not rendered yet: the resume after loading replays it
  const wasNear = nearBottom();
  applyEvent(t, m);
  scrollBottom(false, wasNear);
}

function onSessionCreated(m) {
  const p = S.pending.find((x) => !x.session);
  if (p) p.session = m.session_id;
  if (!findSession(m.session_id)) {
    const now = Math.floor(Date.now() / 1000);
    const title = p ? p.message.replace(/\s+/g, " ").slice(0, 60) : "New chat";
    S.sessions.unshift({ id: m.session_id, title, created_at: now, last_active: now, task_count: 0, active_task_count: 1, local: true });
  }
  if (p && p.view === S.view && !S.current) {
    S.current = m.session_id;
    setRoute(m.session_id);
    setHeader(findSession(m.session_id).title);
  }
  renderSidebar();
}

function onTaskCreated(m) {
  const p = S.pending.shift();
  touchSession(m.session_id, { running: true });
  if (m.session_id !== S.current) return;
  if (S.tasks.has(m.task_id)) {
    if (p && p.view === S.view) { p.t.el.remove(); if (p.user) p.user.remove(); }
    return;
  }
  if (p && p.view === S.view) {
    bindTask(p.t, m.task_id);
  } else {
    // Sent from an earlier view of this session; this connection follows it from seq 0.
    clearEmpty();
    if (p) addUserBubble(p.message);
    const t = newTaskView(m.task_id);
    t.status = "pending";
  }
  updateCancel();
}

// ---- opening a session
async function fetchLogs(taskId) {
  const all = [];
  let after = 0;
  for (let guard = 0; guard < 200; guard++) {
    const d = await api("GET", "/api/tasks/" + encodeURIComponent(taskId) + "/logs?after=" + after + "&limit=500");
    all.push(...(d.logs || []));
    if (!d.hasMore || d.next == null || d.next <= after) break;
    after = d.next;
  }
  return all;
}

async function openSession(id) {
  closeSidebar();
  S.current = id;
  setRoute(id);
  resetPanel();
  const view = S.view;
  S.loading = view;
  const s = findSession(id) || (S.searchRows || []).find((r) => r.id === id);
  setHeader(s ? s.title : "");
  if (!s) {
    // Opened from a link (#/s/<id>): its title comes from the server.
    api("GET", "/api/sessions/" + encodeURIComponent(id))
      .then((d) => { if (S.current === id && d && d.title) setHeader(d.title); })
      .catch(() => {});
  }
  renderSidebar();
  const m = messages();
  const loading = el("div", "loading", "Loading…");
  m.appendChild(loading);
  let tasks;
  try {
    tasks = (await api("GET", "/api/sessions/" + encodeURIComponent(id) + "/tasks")).tasks || [];
  } catch (e) {
    if (view === S.view) { S.loading = -1; loading.remove(); toast(e.message); newChat(); }
    return;
  }
  if (view !== S.view) return;
  let logs;
  try {
    logs = await Promise.all(tasks.map((t) => fetchLogs(t.id).catch((e) => { toast(e.message); return []; })));
  } catch (e) { logs = tasks.map(() => []); }
  if (view !== S.view) return;
  S.loading = -1;
  loading.remove();
  tasks.forEach((task, k) => {
    addUserBubble(task.message || "");
    const t = newTaskView(task.id);
    t.status = task.status;
    for (const ev of logs[k]) applyEvent(t, ev);
    if (TERMINAL.has(task.status) && !t.finished) {
      finish(t, task.result || "", {
        status: task.status, error: task.error, cost_usd: task.costUsd, usage: task.usage,
        num_turns: task.numTurns, duration_ms: task.durationMs,
      });
    }
  });
  if (!tasks.length) showEmpty();
  S.usage = usageOf(tasks);
  showUsage();
  scrollBottom(true);
  updateCancel();
  resumeAll();
}

function unfinished() {
  return [...S.tasks.values()].filter((t) => t.id && !t.finished);
}

function resumeAll() {
  if (!S.wsOpen) return;
  for (const t of unfinished()) S.ws.send(JSON.stringify({ type: "resume", task_id: t.id, after_seq: t.lastSeq }));
}

function updateCancel() {
  const running = unfinished();
  $("#cancel").hidden = running.length === 0;
}

async function cancelCurrent() {
  const running = unfinished();
  const t = running[running.length - 1];
  if (!t) return;
  const btn = $("#cancel");
  btn.disabled = true;
  setTimeout(() => { btn.disabled = false; }, 1500);
  if (S.wsOpen) {
    S.ws.send(JSON.stringify({ type: "cancel", task_id: t.id }));
  } else {
    try { await api("POST", "/api/tasks/" + encodeURIComponent(t.id) + "/cancel"); } catch (e) { toast(e.message); }
  }
}

// ---- sending
function sendMessage() {
  const input = $("#message-input");
  const text = input.value.trim();
  if (!text) return;
  if (S.loading === S.view) { toast("Loading the conversation, one moment.", "info"); return; }
  if (!S.current && S.pending.some((p) => p.view === S.view && !p.session)) {
    toast("One moment, the conversation is being created.", "info");
    return;
  }
  clearEmpty();
  const user = addUserBubble(text);
  const t = newTaskView(null);
  const payload = { type: "chat", message: text };
  if (S.current) payload.session_id = S.current;
  const p = { t, user, view: S.view, session: S.current, message: text, payload, sent: false };
  S.pending.push(p);
  if (S.wsOpen) { S.ws.send(JSON.stringify(payload)); p.sent = true; }
  input.value = "";
  autosize();
  scrollBottom(true);
}

function autosize() {
  const i = $("#message-input");
  i.style.height = "auto";
  i.style.height = Math.min(i.scrollHeight, 220) + "px";
  $("#composer").classList.toggle("has-text", !!i.value.trim());
}

// ---- WebSocket
function setConn(state) {
  const c = $("#conn-status");
  c.dataset.state = state;
  c.lastChild.textContent = state === "connected" ? "Connected" : state === "reconnecting" ? "Reconnecting…" : "Connecting…";
  c.title = state === "connected" ? "Live connection to the server" : "Trying to reach the server";
}

function connect() {
  clearTimeout(S.retry);
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  let ws;
  const token = apiToken();
  // The token rides in a subprotocol (browsers cannot set headers on a WebSocket).
  try { ws = token ? new WebSocket(url, ["anywork", "anywork.token." + token]) : new WebSocket(url); } catch (_) { scheduleReconnect(); return; }
  S.ws = ws;
  ws.onopen = () => {
    if (S.ws !== ws) return;
    S.wsOpen = true;
    S.backoff = 500;
    setConn("connected");
    clearInterval(S.ping);
    S.ping = setInterval(() => { if (S.wsOpen) ws.send('{"type":"ping"}'); }, 25000);
    if (S.everOpen) refreshSessionsSoon();
    S.everOpen = true;
    for (const p of S.pending) {
      if (!p.sent) { ws.send(JSON.stringify(p.payload)); p.sent = true; }
      updateIndicator(p.t);
    }
    resumeAll();
  };
  ws.onmessage = (e) => {
    let m;
    try { m = JSON.parse(e.data); } catch (_) { return; }
    if (m && typeof m === "object") {
      try { onMessage(m); } catch (err) { console.error(err); }
    }
  };
  ws.onclose = () => {
    if (S.ws !== ws) return;
    S.ws = null;
    S.wsOpen = false;
    clearInterval(S.ping);
    // Chats not yet acknowledged may be lost with the connection.
    const lost = S.pending.filter((p) => p.sent);
    S.pending = S.pending.filter((p) => !p.sent);
    for (const p of lost) {
      if (p.view !== S.view) continue;
      addNotice(p.t, "The connection dropped before the server accepted this message. Please send it again.", "error");
      p.t.finished = true;
      p.t.el.dataset.status = "failed";
      updateIndicator(p.t);
    }
    setConn("reconnecting");
    scheduleReconnect();
  };
  ws.onerror = () => { /* onclose follows */ };
}

function scheduleReconnect() {
  clearTimeout(S.retry);
  S.retry = setTimeout(connect, S.backoff);
  S.backoff = Math.min(S.backoff * 2, 5000);
}

// ---- health banner
async function loadHealth() {
  let h;
  try { h = await api("GET", "/api/health"); } catch (e) { toast(e.message); return; }
  const banner = $("#banner");
  banner.textContent = "";
  if (h.demo) {
    const d = el("div", "banner-line demo");
    d.appendChild(el("strong", null, "Demo mode: "));
    d.appendChild(document.createTextNode("answers come from a built-in fake model"));
    banner.appendChild(d);
  }
  if (h.warning) banner.appendChild(el("div", "banner-line warn", h.warning));
  showSetup(banner, h);
  banner.hidden = !banner.childNodes.length;
  if (h.version) $(".brand").title = "AnyWork " + h.version + (h.driver ? " · " + h.driver : "");
}

// ---- setup check: what the server found missing at start (per driver), one banner line each
function showSetup(banner, h) {
  const problems = (Array.isArray(h.setup) ? h.setup : []).filter((c) => c && !c.ok && c.message !== h.warning);
  for (const c of problems) {
    const line = el("div", "banner-line warn setup-problem");
    line.dataset.check = c.name || "";
    line.appendChild(el("strong", null, "Setup (" + (h.driver || "server") + ", " + (c.name || "check") + "): "));
    line.appendChild(document.createTextNode(c.message || ""));
    banner.appendChild(line);
  }
}

// ---- rename
function startRename() {
  if (!S.current) return;
  const h = $("#chat-title");
  if (h.isContentEditable) return;
  const id = S.current;
  const before = h.textContent;
  h.contentEditable = "true";
  h.classList.add("editing");
  h.focus();
  const range = document.createRange();
  range.selectNodeContents(h);
  const sel = getSelection();
  sel.removeAllRanges();
  sel.addRange(range);
  let done = false;
  const end = async (save) => {
    if (done) return;
    done = true;
    h.contentEditable = "false";
    h.classList.remove("editing");
    h.removeEventListener("keydown", onKey);
    const title = h.textContent.replace(/\s+/g, " ").trim();
    if (!save || !title || title === before) { h.textContent = before; return; }
    h.textContent = title;
    try {
      await api("PATCH", "/api/sessions/" + encodeURIComponent(id), { title });
      setSessionTitle(id, title);
    } catch (e) {
      toast(e.message);
      if (S.current === id) h.textContent = before;
    }
  };
  const onKey = (e) => {
    if (e.key === "Enter") { e.preventDefault(); end(true); }
    if (e.key === "Escape") { e.preventDefault(); end(false); }
  };
  h.addEventListener("keydown", onKey);
  h.addEventListener("blur", () => end(true), { once: true });
}

// ---- SOUL.md / AGENTS.md editor
// Two scopes, clearly labelled: the server's defaults (stored; new sessions start with them)
// or the open session's own files (through its running worker; nothing is started to read them).
const DOC = { name: "soul", loaded: "", seq: 0, scope: "defaults", session: null };
const DOC_SCOPE_HINTS = {
  defaults: "Defaults: sessions created from now on start with these files. Existing sessions keep their own copy.",
  session: "This session only: the files in this conversation's workspace, used from its next message on.",
};

function docPath(name) {
  return DOC.scope === "session" && DOC.session
    ? "/api/sessions/" + encodeURIComponent(DOC.session) + "/workspace/" + name
    : "/api/workspace/" + name;
}

function setDocScope(scope) {
  if (scope === DOC.scope) return;
  if (docDirty() && !confirm("Discard unsaved changes?")) {
    $("#doc-scope-" + DOC.scope).checked = true;
    return;
  }
  DOC.scope = scope;
  DOC.loaded = $("#doc-editor").value = "";
  loadDoc(DOC.name);
}

function showDocScope() {
  const s = DOC.session && findSession(DOC.session);
  const title = s ? s.title : "";
  $("#doc-scope-session").disabled = !DOC.session;
  $("#doc-scope-session-label").textContent = DOC.session ? "This session" + (title ? ": " + title : "") : "This session (open one first)";
  $("#doc-scope-" + DOC.scope).checked = true;
  $("#doc-scope-hint").textContent = DOC_SCOPE_HINTS[DOC.scope];
  $("#doc-modal").dataset.scope = DOC.scope;
  $("#doc-heading").textContent = "Soul & instructions · " + (DOC.scope === "session" ? "this session" : "defaults for new sessions");
}
const DOC_HINTS = {
  soul: "The agent's personality and voice.",
  agents: "Standing instructions for every task.",
};

function docStatus(text, kind) {
  const s = $("#doc-status");
  s.textContent = text;
  s.dataset.kind = kind || "";
}

function docDirty() { return $("#doc-editor").value !== DOC.loaded; }

async function loadDoc(name) {
  if (name !== DOC.name && docDirty() && !confirm("Discard unsaved changes?")) return;
  DOC.name = name;
  const seq = ++DOC.seq;
  for (const b of document.querySelectorAll("#doc-modal .tab")) {
    const on = b.dataset.doc === name;
    b.classList.toggle("active", on);
    b.setAttribute("aria-selected", on ? "true" : "false");
  }
  $("#doc-hint").textContent = DOC_HINTS[name];
  const ed = $("#doc-editor");
  ed.value = "";
  DOC.loaded = "";
  ed.disabled = true;
  docStatus("Loading…");
  showDocScope();
  try {
    const d = await api("GET", docPath(name));
    if (seq !== DOC.seq) return;
    DOC.loaded = d.content || "";
    ed.value = DOC.loaded;
    docStatus("");
  } catch (e) {
    if (seq !== DOC.seq) return;
    docStatus("Could not load", "error");
    if (DOC.scope === "session") {
      // No worker runs for the session now: say so where the text would be, edit nothing.
      $("#doc-scope-hint").textContent = e.message;
      return;
    }
    toast(e.message);
  }
  ed.disabled = false;
  ed.focus();
}

async function saveDoc() {
  const ed = $("#doc-editor");
  if (ed.disabled) return;
  const name = DOC.name, content = ed.value;
  const btn = $("#doc-save");
  btn.disabled = true;
  docStatus("Saving…");
  try {
    const d = await api("PUT", docPath(name), { content });
    if (name === DOC.name) {
      DOC.loaded = d.content != null ? d.content : content;
      docStatus("Saved", "ok");
      setTimeout(() => { if ($("#doc-status").textContent === "Saved") docStatus(""); }, 2500);
    }
  } catch (e) {
    docStatus("Not saved", "error");
    toast(e.message);
  }
  btn.disabled = false;
}

function openDocs() {
  $("#doc-modal").hidden = false;
  DOC.loaded = $("#doc-editor").value = "";
  DOC.session = S.current;
  if (!DOC.session) DOC.scope = "defaults";
  loadDoc("soul");
}

function closeDocs() {
  if (docDirty() && !confirm("Discard unsaved changes?")) return;
  $("#doc-modal").hidden = true;
  DOC.seq++;
}

// ---- workspace files: the open session's files/ folder (list, open text, download, zip, upload)
const FILES = { open: false, seq: 0 };
const MAX_VIEW = 1024 * 1024;

function filesBase(id) { return "/api/sessions/" + encodeURIComponent(id) + "/files"; }

// fetch with the API token when the server has one (links cannot carry it: downloads go
// through fetch, then a blob).
function authedFetch(url, opts = {}) {
  const token = typeof apiToken === "function" ? apiToken() : "";
  const headers = Object.assign({}, opts.headers || {});
  if (token) headers.authorization = "Bearer " + token;
  return fetch(url, Object.assign({}, opts, { headers }));
}

async function errorOf(r) {
  const d = await r.json().catch(() => ({}));
  return new Error((d.error && d.error.message) || r.status + " " + r.statusText);
}

async function download(e) {
  const a = e.target.closest("a[download]");
  if (!a) return;
  e.preventDefault();
  try {
    const r = await authedFetch(a.href);
    if (!r.ok) throw await errorOf(r);
    const blob = await r.blob();
    const link = el("a");
    link.href = URL.createObjectURL(blob);
    link.download = a.getAttribute("download") || "download";
    document.body.appendChild(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  } catch (err) { toast(err.message); }
}
function filePath(path) { return path.split("/").map(encodeURIComponent).join("/"); }

function humanSize(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
  return (n / 1024 / 1024).toFixed(1) + " MB";
}

async function loadFiles() {
  const list = $("#files-list");
  const note = $("#files-note");
  const seq = ++FILES.seq;
  list.textContent = "";
  $("#files-viewer").hidden = true;
  const id = S.current;
  $("#files-zip").hidden = !id;
  $(".files-upload").hidden = !id;
  if (!id) { note.textContent = "Open a conversation to see its files."; return; }
  $("#files-zip").href = filesBase(id) + ".zip";
  note.textContent = "Loading…";
  let d;
  try { d = await api("GET", filesBase(id)); } catch (e) {
    if (seq === FILES.seq) note.textContent = e.message;
    return;
  }
  if (seq !== FILES.seq) return;
  const files = d.files || [];
  note.textContent = files.length ? files.length + (files.length === 1 ? " file" : " files") + " in files/" + (d.truncated ? " (list cut short)" : "") : "No files yet. Upload some, or ask the agent to write into files/.";
  for (const f of files) {
    const li = el("li", "file-item");
    li.dataset.path = f.path;
    const name = button("file-name", f.path, () => viewFile(id, f));
    name.title = "Open " + f.path;
    const size = el("span", "file-size muted small", humanSize(f.size || 0));
    const dl = el("a", "file-download", "Download");
    dl.href = filesBase(id) + "/" + filePath(f.path);
    dl.setAttribute("download", f.path.split("/").pop());
    li.append(name, size, dl);
    list.appendChild(li);
  }
}

async function viewFile(id, f) {
  const viewer = $("#files-viewer");
  $("#files-viewer-name").textContent = f.path;
  const text = $("#files-viewer-text");
  viewer.hidden = false;
  if ((f.size || 0) > MAX_VIEW) { text.textContent = "Too large to show here (" + humanSize(f.size) + "): download it."; return; }
  text.textContent = "Loading…";
  try {
    const r = await authedFetch(filesBase(id) + "/" + filePath(f.path) + "?inline=1");
    if (!r.ok) throw await errorOf(r);
    const bytes = new Uint8Array(await r.arrayBuffer());
    let shown;
    try { shown = new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch (_) { shown = null; }
    text.textContent = shown == null || shown.includes("\u0000") ? "Not a text file: download it." : shown;
  } catch (e) { text.textContent = e.message; }
}

async function uploadFiles(input) {
  const id = S.current;
  if (!id) return;
  const picked = [...input.files];
  input.value = "";
  for (const file of picked) {
    try {
      const r = await authedFetch(filesBase(id) + "/" + filePath(file.name), { method: "PUT", body: file, headers: { "content-type": "application/octet-stream" } });
      if (!r.ok) throw await errorOf(r);
      toast("Uploaded " + file.name + " to files/", "info");
    } catch (e) { toast(file.name + ": " + e.message); }
  }
  loadFiles();
}

function openFiles() { FILES.open = true; $("#files-panel").hidden = false; loadFiles(); }
function closeFiles() { FILES.open = false; $("#files-panel").hidden = true; }
function filesFollowSession() { if (FILES.open) loadFiles(); }

// ---- admin page (#/admin): workers with health, running and queued tasks, a task's timeline
async function showAdmin() {
  $("#admin-page").hidden = false;
  const [w, t] = await Promise.all([
    api("GET", "/api/admin/workers").catch((e) => ({ error: e.message })),
    api("GET", "/api/admin/tasks").catch((e) => ({ error: e.message })),
  ]);
  const wb = $("#admin-workers tbody");
  wb.textContent = "";
  if (w.error) wb.appendChild(adminRow([w.error]));
  for (const x of w.workers || []) {
    const tr = adminRow([x.endpoint && x.endpoint.worker_id, x.session_id || "(shared)", x.healthy ? "healthy" : "not answering"]);
    tr.dataset.healthy = x.healthy ? "true" : "false";
    wb.appendChild(tr);
  }
  if (!w.error && !(w.workers || []).length) wb.appendChild(adminRow(["No worker runs now (" + (w.driver || "") + ")"]));
  $("#admin-load").textContent = (w.driver ? "driver " + w.driver + " · " : "") + (t.running || 0) + " running · " + (t.queueDepth || 0) + " queued here";
  const tb = $("#admin-tasks tbody");
  tb.textContent = "";
  if (t.error) tb.appendChild(adminRow([t.error]));
  for (const x of t.tasks || []) {
    const tr = adminRow([x.id, x.status, x.sessionId, clip(String(x.message || "").replace(/\s+/g, " "), 80), relTime(Math.floor((x.startedAt || x.createdAt || 0) / 1000))]);
    tr.classList.add("admin-task");
    tr.dataset.taskId = x.id;
    tr.addEventListener("click", () => { $("#admin-task-id").value = x.id; showTimeline(x.id); });
    tb.appendChild(tr);
  }
  if (!t.error && !(t.tasks || []).length) tb.appendChild(adminRow(["Nothing running or queued"]));
}

function adminRow(cells) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(el("td", null, c == null ? "" : String(c)));
  return tr;
}

async function showTimeline(taskId) {
  const list = $("#admin-timeline");
  list.textContent = "";
  if (!taskId) return;
  let logs;
  try { logs = await fetchLogs(taskId); } catch (e) { list.appendChild(el("li", "muted", e.message)); return; }
  let first = null;
  for (const ev of logs) {
    if (first == null) first = ev.timestamp || 0;
    const li = el("li", "timeline-item");
    li.dataset.type = ev.type;
    li.appendChild(el("span", "timeline-at muted small", "+" + Math.max(0, (ev.timestamp || 0) - first) + "s"));
    li.appendChild(el("span", "timeline-type", ev.type));
    const md = ev.metadata || {};
    const what = ev.type === "tool_call" ? (ev.content || "") + " " + JSON.stringify(md.input || {}) : ev.type === "done" ? (md.status || "") + (md.error ? ": " + md.error : "") : ev.content || "";
    li.appendChild(el("span", "timeline-text", clip(String(what), 300)));
    list.appendChild(li);
  }
  if (!logs.length) list.appendChild(el("li", "muted", "No events"));
}

function hideAdmin() { $("#admin-page").hidden = true; }

// ---- per-session URLs: #/s/<id> names the open conversation (reload keeps it, links share it)
function routeSession() {
  const m = /^#\/s\/(.+)$/.exec(location.hash || "");
  if (!m) return null;
  try { return decodeURIComponent(m[1]); } catch (_) { return null; }
}

function setRoute(id) {
  const want = id ? "#/s/" + encodeURIComponent(id) : "";
  if ((location.hash || "") === want) return;
  history.replaceState(null, "", want || location.pathname + location.search);
}

function onHashChange() {
  if (location.hash === "#/admin") { showAdmin(); return; }
  hideAdmin();
  const id = routeSession();
  if (id && id !== S.current) openSession(id);
  else if (!id && S.current) newChat();
}

// ---- cost and tokens: of the open conversation (header), summed from its tasks
function usageOf(tasks) {
  const u = { cost: 0, input: 0, output: 0 };
  for (const t of tasks) {
    u.cost += Number(t.costUsd || 0);
    const usage = t.usage || {};
    u.input += Number(usage.input_tokens || 0);
    u.output += Number(usage.output_tokens || 0);
  }
  return u;
}

function addUsage(md) {
  if (!S.usage) S.usage = { cost: 0, input: 0, output: 0 };
  S.usage.cost += Number(md.cost_usd || 0);
  const usage = md.usage || {};
  S.usage.input += Number(usage.input_tokens || 0);
  S.usage.output += Number(usage.output_tokens || 0);
  showUsage();
}

function showUsage() {
  const u = S.current && S.usage;
  const box = $("#session-usage");
  $("#export-button").hidden = !S.current;
  if (!u || (!u.cost && !u.input && !u.output)) { box.textContent = ""; return; }
  const tokens = u.input + u.output;
  box.textContent = "$" + u.cost.toFixed(4) + " · " + tokenCount(tokens) + " tokens";
  box.title = "This conversation: $" + u.cost.toFixed(6) + ", " + u.input + " input and " + u.output + " output tokens";
}

// ---- export: the open conversation as a Markdown file
async function exportMarkdown() {
  const id = S.current;
  if (!id) return;
  let tasks;
  try { tasks = (await api("GET", "/api/sessions/" + encodeURIComponent(id) + "/tasks?limit=500")).tasks || []; } catch (e) { toast(e.message); return; }
  const s = findSession(id);
  const title = (s && s.title) || "Conversation";
  const lines = ["# " + title, "", "_Exported from AnyWork on " + new Date().toISOString() + " (session " + id + ")_", ""];
  for (const t of tasks) {
    lines.push("## You", "", t.message || "", "");
    lines.push("## Agent", "");
    if (t.result) lines.push(t.result, "");
    if (t.status === "failed") lines.push("> **Failed:** " + String(t.error || "the task failed").replace(/\n/g, "\n> "), "");
    if (t.status === "canceled") lines.push("> _Canceled_", "");
    if (!TERMINAL.has(t.status)) lines.push("> _Still " + t.status + "_", "");
  }
  const u = usageOf(tasks);
  if (u.cost || u.input || u.output) lines.push("---", "", "Cost: $" + u.cost.toFixed(4) + " · " + u.input + " input / " + u.output + " output tokens", "");
  const blob = new Blob([lines.join("\n")], { type: "text/markdown;charset=utf-8" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = (title.replace(/[^\w\- ]+/g, "").trim().replace(/\s+/g, "-") || "conversation") + ".md";
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  // The last export, for scripts and tests (the download itself leaves the page).
  window.AnyWorkLastExport = lines.join("\n");
}

// ---- layout
function openSidebar() { document.body.classList.add("sidebar-open"); $("#scrim").hidden = false; }
function closeSidebar() { document.body.classList.remove("sidebar-open"); $("#scrim").hidden = true; }

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  const b = $("#theme-toggle");
  b.innerHTML = theme === "dark"
    ? '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="4"/><path d="M12 2v2M12 20v2M4.9 4.9l1.4 1.4M17.7 17.7l1.4 1.4M2 12h2M20 12h2M4.9 19.1l1.4-1.4M17.7 6.3l1.4-1.4"/></svg>'
    : '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M20 14.5A8 8 0 0 1 9.5 4a8 8 0 1 0 10.5 10.5z"/></svg>';
  b.title = theme === "dark" ? "Switch to light theme" : "Switch to dark theme";
}

// ---- wiring
function init() {
  let theme = "dark";
  try { theme = localStorage.getItem(THEME_KEY) === "light" ? "light" : "dark"; } catch (_) { /* private mode */ }
  applyTheme(theme);
  $("#theme-toggle").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    applyTheme(next);
    try { localStorage.setItem(THEME_KEY, next); } catch (_) { /* ignore */ }
  });

  $("#new-chat").addEventListener("click", newChat);
  $("#sidebar-open").addEventListener("click", openSidebar);
  $("#sidebar-close").addEventListener("click", closeSidebar);
  $("#scrim").addEventListener("click", closeSidebar);

  const list = $("#session-list");
  list.addEventListener("click", (e) => {
    const item = e.target.closest(".session-item");
    if (!item) return;
    const id = item.dataset.sessionId;
    if (e.target.closest(".session-delete")) { e.stopPropagation(); deleteSession(id); return; }
    if (id !== S.current) openSession(id);
    else closeSidebar();
  });
  list.addEventListener("keydown", (e) => {
    const item = e.target.closest(".session-item");
    if (item && (e.key === "Enter" || e.key === " ") && e.target === item) { e.preventDefault(); item.click(); }
  });

  $("#chat-title").addEventListener("dblclick", startRename);

  const input = $("#message-input");
  input.addEventListener("input", autosize);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      sendMessage();
    }
  });
  $("#composer").addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
  $("#cancel").addEventListener("click", cancelCurrent);

  messages().addEventListener("click", (e) => {
    const b = e.target.closest(".code-block .copy");
    if (b) copyText(b.closest(".code-block").querySelector("code").textContent, b);
  });

  $("#export-button").addEventListener("click", exportMarkdown);
  $("#session-search").addEventListener("input", (e) => onSearchInput(e.target.value));
  window.addEventListener("hashchange", onHashChange);
  $("#admin-refresh").addEventListener("click", showAdmin);
  $("#admin-close").addEventListener("click", (e) => { e.preventDefault(); hideAdmin(); setRoute(S.current); });
  $("#admin-timeline-form").addEventListener("submit", (e) => { e.preventDefault(); showTimeline($("#admin-task-id").value.trim()); });
  $("#files-button").addEventListener("click", () => (FILES.open ? closeFiles() : openFiles()));
  $("#files-close").addEventListener("click", closeFiles);
  $("#files-refresh").addEventListener("click", loadFiles);
  $("#files-viewer-close").addEventListener("click", () => { $("#files-viewer").hidden = true; });
  $("#files-upload").addEventListener("change", (e) => uploadFiles(e.target));
  $("#files-panel").addEventListener("click", download);
  $("#soul-button").addEventListener("click", openDocs);
  $("#doc-close").addEventListener("click", closeDocs);
  $("#doc-save").addEventListener("click", saveDoc);
  $("#doc-scope-defaults").addEventListener("change", () => setDocScope("defaults"));
  $("#doc-scope-session").addEventListener("change", () => setDocScope("session"));
  $("#doc-tab-soul").addEventListener("click", () => { if (DOC.name !== "soul") loadDoc("soul"); });
  $("#doc-tab-agents").addEventListener("click", () => { if (DOC.name !== "agents") loadDoc("agents"); });
  $("#doc-modal").addEventListener("mousedown", (e) => { if (e.target.id === "doc-modal") closeDocs(); });
  $("#doc-editor").addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "s") { e.preventDefault(); saveDoc(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (!$("#doc-modal").hidden) { e.preventDefault(); closeDocs(); } else closeSidebar();
  });

  // Relative times age; the total also counts tasks other pages and channels ran.
  setInterval(() => { if (!document.hidden) { renderSidebar(); loadTotalSoon(); } }, 60000);

  setConn("connecting");
  connect();
  loadHealth();
  loadTotal().catch(() => {});
  const routed = routeSession();
  if (routed) openSession(routed);
  if (location.hash === "#/admin") showAdmin();
  loadSessions()
    .then(() => {
      if (S.current) { renderSidebar(); setHeader((findSession(S.current) || {}).title || $("#chat-title").textContent); return; }
      if (S.pending.length) return;
      if (S.sessions.length) openSession(S.sessions[0].id);
      else newChat();
    })
    .catch((e) => { toast(e.message); if (!S.current) newChat(); });
  showEmpty();
  autosize();
  input.focus();
}

// Exposed for tests in node (no DOM needed for the renderer).
if (typeof window !== "undefined") window.AnyWorkMarkdown = markdown;
if (typeof document !== "undefined" && document.getElementById("app")) {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
}
})();
