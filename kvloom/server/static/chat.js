// The chat page: streams /v1/chat/completions over SSE (fetch + ReadableStream), renders
// Markdown, stops with an AbortController, keeps conversations in localStorage.
import { apiFetch, errorMessage, fmt, forgetKey, Unauthorized } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const STORE = "kvloom.conversations";
const CURRENT = "kvloom.currentConversation";
const SETTINGS = "kvloom.chatSettings";
const $ = (id) => document.getElementById(id);

let conversations = load(STORE, []);
let currentId = localStorage.getItem(CURRENT);
let active = null;            // the answer being streamed: {controller, conv, msg, bubble}

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch (_) { return fallback; }
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  if (currentId) localStorage.setItem(CURRENT, currentId);
}
const uid = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
const current = () => conversations.find((c) => c.id === currentId) || null;

function newConversation() {
  const conv = { id: uid(), title: "New chat", messages: [], updated: Date.now() };
  conversations.unshift(conv);
  currentId = conv.id;
  save();
  return conv;
}

// ---- settings ---------------------------------------------------------------------------

const FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed"];
function restoreSettings() {
  const s = load(SETTINGS, {});
  for (const f of FIELDS) if (s[f] !== undefined) $(f).value = s[f];
  for (const f of FIELDS) $(f).addEventListener("change", storeSettings);
}
function storeSettings() {
  const s = {};
  for (const f of FIELDS) s[f] = $(f).value;
  s.model = $("model").value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}
function numberField(id) {
  const v = $(id).value.trim();
  return v === "" || Number.isNaN(Number(v)) ? undefined : Number(v);
}

async function loadModels() {
  const select = $("model");
  try {
    const resp = await apiFetch("/v1/models");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const { data } = await resp.json();
    select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    const saved = load(SETTINGS, {}).model;
    if (saved && data.some((m) => m.id === saved)) select.value = saved;
  } catch (e) {
    select.replaceChildren(new Option(e instanceof Unauthorized ? "(API key needed)" : "(no models)", ""));
  }
  select.addEventListener("change", storeSettings);
}

// ---- rendering --------------------------------------------------------------------------

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...conversations.map((c) => {
    const li = document.createElement("li");
    li.className = c.id === currentId ? "active" : "";
    li.dataset.id = c.id;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = c.title;
    title.title = c.title;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "link delete";
    del.textContent = "✕";
    del.title = "Delete conversation";
    del.addEventListener("click", (e) => {
      e.stopPropagation();
      if (active && active.conv === c) stop();
      conversations = conversations.filter((x) => x !== c);
      if (currentId === c.id) currentId = conversations[0]?.id || null;
      save();
      renderAll();
    });
    li.append(title, del);
    li.addEventListener("click", () => { currentId = c.id; save(); renderAll(); });
    return li;
  }));
}

function figures(stats) {
  const parts = [];
  if (stats.ttft !== undefined) parts.push(["ttft", `TTFT ${fmt(stats.ttft, 2)} s`]);
  if (stats.tps !== undefined) parts.push(["tps", `${fmt(stats.tps, 1)} tok/s`]);
  if (stats.completion_tokens !== undefined) parts.push(["tokens", `${stats.completion_tokens} tokens`]);
  if (stats.cached_tokens !== undefined)
    parts.push(["cached", `${stats.cached_tokens}/${stats.prompt_tokens} prompt tokens cached`]);
  if (stats.stopped) parts.push(["stopped", "stopped"]);
  else if (stats.finish_reason) parts.push(["finish", stats.finish_reason]);
  const el = document.createElement("span");
  el.className = "figures";
  for (const [k, text] of parts) {
    const s = document.createElement("span");
    s.className = k;
    s.textContent = text;
    el.append(s);
  }
  return el;
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `link ${cls}`;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function renderMessages() {
  const box = $("messages");
  const conv = current();
  if (!conv || conv.messages.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Ask something. Answers stream from this kvloom server.";
    box.replaceChildren(empty);
    return;
  }
  const lastAnswer = conv.messages.findLastIndex((m) => m.role !== "user");
  box.replaceChildren(...conv.messages.map((m, i) => {
    const wrap = document.createElement("div");
    wrap.className = `msg ${m.role}`;
    wrap.dataset.index = i;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = m.role === "user" ? "you" : m.role === "error" ? "error" : "assistant";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (m.role === "assistant") bubble.innerHTML = renderMarkdown(m.content);
    else bubble.textContent = m.content;
    const meta = document.createElement("div");
    meta.className = "meta";
    if (m.stats) meta.append(figures(m.stats));
    const actions = document.createElement("span");
    actions.className = "actions";
    const busy = active !== null;
    if (m.role === "user" && !busy) actions.append(button("Edit", "edit", () => editMessage(wrap, bubble, i)));
    if (m.role === "assistant") actions.append(button("Copy", "copy-answer", () => navigator.clipboard?.writeText(m.content)));
    if (i === lastAnswer && !busy) actions.append(button("Regenerate", "regenerate", regenerate));
    meta.append(actions);
    if (active && active.msg === m) {
      bubble.classList.add("streaming");
      active.bubble = bubble;
      active.meta = meta;
    }
    wrap.append(role, bubble, meta);
    return wrap;
  }));
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderConversations();
  renderMessages();
  const busy = active !== null;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.streaming = busy ? "1" : "0";
}

function editMessage(wrap, bubble, index) {
  const conv = current();
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = conv.messages[index].content;
  const saveBtn = button("Save & send", "save-edit", () => {
    const text = area.value.trim();
    if (!text) return;
    conv.messages = conv.messages.slice(0, index);
    conv.messages.push({ role: "user", content: text });
    if (index === 0) conv.title = text.slice(0, 48);
    generate(conv);
  });
  const cancel = button("Cancel", "cancel-edit", renderMessages);
  bubble.replaceWith(area);
  wrap.querySelector(".actions").replaceChildren(saveBtn, cancel);
  area.focus();
}

// ---- streaming --------------------------------------------------------------------------

function send(text) {
  const conv = current() || newConversation();
  if (conv.messages.length === 0) conv.title = text.slice(0, 48);
  conv.messages.push({ role: "user", content: text });
  generate(conv);
}

function regenerate() {
  const conv = current();
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role !== "user") conv.messages.pop();
  if (conv.messages.length) generate(conv);
}

function stop() {
  if (active) active.controller.abort();
}

function requestBody(conv) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conv.messages) if ((m.role === "user" || m.role === "assistant") && m.content) messages.push({ role: m.role, content: m.content });
  const body = { model: $("model").value || undefined, messages, stream: true, stream_options: { include_usage: true } };
  for (const [field, id] of [["temperature", "temperature"], ["top_p", "top_p"], ["max_tokens", "max_tokens"], ["seed", "seed"]]) {
    const v = numberField(id);
    if (v !== undefined) body[field] = v;
  }
  return body;
}

async function generate(conv) {
  if (active) return;
  const body = requestBody(conv);
  const msg = { role: "assistant", content: "", stats: {} };
  conv.messages.push(msg);
  conv.updated = Date.now();
  conversations = [conv, ...conversations.filter((c) => c !== conv)];
  const controller = new AbortController();
  active = { controller, conv, msg, bubble: null, meta: null };
  save();
  renderAll();

  const t0 = performance.now();
  let tFirst = null;
  let chunks = 0;
  let usage = null;
  let finish = null;
  let pending = false;
  const paint = () => {
    pending = false;
    if (active && active.bubble && active.msg === msg) {
      active.bubble.innerHTML = renderMarkdown(msg.content);
      const box = $("messages");
      box.scrollTop = box.scrollHeight;
    }
  };
  try {
    const resp = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.finish_reason) finish = choice.finish_reason;
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (tFirst === null) tFirst = performance.now();
            chunks += 1;
            msg.content += text;
            if (!pending) { pending = true; requestAnimationFrame(paint); }
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stats.stopped = true;
    else conv.messages.push({ role: "error", content: e instanceof Unauthorized ? "No API key given." : String(e.message || e) });
  }
  const tEnd = performance.now();
  const n = usage ? usage.completion_tokens : chunks;
  if (tFirst !== null) {
    msg.stats.ttft = (tFirst - t0) / 1000;
    if (n > 1 && tEnd > tFirst) msg.stats.tps = (n - 1) / ((tEnd - tFirst) / 1000);
  }
  if (usage) {
    msg.stats.completion_tokens = usage.completion_tokens;
    msg.stats.prompt_tokens = usage.prompt_tokens;
    const cached = usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens;
    if (cached !== undefined && cached !== null) msg.stats.cached_tokens = cached;
  } else if (chunks) {
    msg.stats.completion_tokens = chunks;
  }
  if (finish) msg.stats.finish_reason = finish;
  if (!msg.content && !msg.stats.stopped && conv.messages[conv.messages.length - 1] !== msg) {
    conv.messages.splice(conv.messages.indexOf(msg), 1);   // failed before any text: keep only the error
  }
  active = null;
  conv.updated = Date.now();
  save();
  renderAll();
}

// ---- wiring -----------------------------------------------------------------------------

function init() {
  restoreSettings();
  if (!current()) currentId = conversations[0]?.id || null;
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || active) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (active) return;
    const empty = conversations.find((c) => c.messages.length === 0);
    currentId = empty ? empty.id : newConversation().id;
    save();
    renderAll();
    $("prompt").focus();
  });
  $("forget-key").addEventListener("click", forgetKey);
  $("messages").addEventListener("click", (e) => {       // copy buttons of code blocks
    if (e.target.matches("pre button.copy")) navigator.clipboard?.writeText(e.target.parentElement.querySelector("code").textContent);
  });
  window.addEventListener("beforeunload", save);
  renderAll();
  loadModels();
}

init();
