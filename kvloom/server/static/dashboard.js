// The live dashboard: polls /dashboard/stats every second (JSON; one entry per engine
// instance), turns counter totals into rates over the last few seconds, draws the charts,
// and shows the inference stack from /server_info.
import { apiFetch, errorMessage, fmt, Unauthorized } from "./api.js";
import { COLORS, LineChart } from "./charts.js";

const POLL_MS = 1000;
const RATE_SECONDS = 5;        // rates are averaged over this much history
const $ = (id) => document.getElementById(id);
const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)} %`);
const ms = (v) => (v === null || v === undefined ? "–" : v < 1 ? `${(1000 * v).toFixed(0)} ms` : `${v.toFixed(2)} s`);

const TILES = [
  ["tok_s", "Output tokens/s"], ["running", "Running requests"], ["waiting", "Waiting requests"],
  ["kv", "KV cache use"], ["prefix", "Prefix-cache hit rate"], ["spec", "Speculation acceptance"],
  ["preempt", "Preemptions"], ["ttft", "TTFT p50"], ["tpot", "TPOT p50"], ["requests", "Requests finished"],
];
const CHARTS = [
  ["tok_s", "Output tokens/s", ["tok/s"], {}],
  ["reqs", "Requests", ["running", "waiting"], { format: (v) => v.toFixed(0) }],
  ["kv", "KV cache use", ["% of blocks"], { max: 100, format: (v) => `${v.toFixed(0)}%` }],
  ["prefix", "Prefix-cache hit rate", ["hits / lookups"], { max: 100, format: (v) => `${v.toFixed(0)}%` }],
  ["spec", "Speculation acceptance", ["accepted / drafted"], { max: 100, format: (v) => `${v.toFixed(0)}%` }],
  ["preempt", "Preemptions", ["per second"], { format: (v) => v.toFixed(2) }],
  ["ttft", "Time to first token (last 60 s)", ["p50", "p90", "p99"], { format: (v) => `${v.toFixed(2)}s` }],
  ["tpot", "Time per output token (last 60 s)", ["p50", "p90", "p99"], { format: (v) => `${v.toFixed(0)}ms` }],
];

const instances = new Map();   // id -> {el, tiles, charts, history}

function element(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function instanceView(inst) {
  let view = instances.get(inst.id);
  if (view) return view;
  const el = element("section", "instance");
  el.dataset.instance = inst.id;
  el.append(element("h2", "", `Instance ${inst.id} · ${inst.model}`));
  const tiles = {};
  const tileBox = element("div", "tiles");
  for (const [k, label] of TILES) {
    const t = element("div", "tile");
    t.dataset.k = k;
    const value = element("div", "value", "–");
    const sub = element("div", "sub", "\u00a0");
    t.append(element("div", "label", label), value, sub);
    tiles[k] = { value, sub };
    tileBox.append(t);
  }
  const charts = {};
  const chartBox = element("div", "charts");
  for (const [k, title, series, opts] of CHARTS) {
    const box = element("div", "chart");
    box.dataset.k = k;
    const head = element("div", "head");
    head.append(element("span", "title", title));
    const legend = element("span", "legend");
    series.forEach((name, i) => {
      const swatch = element("i");
      swatch.style.background = COLORS[i % COLORS.length];
      legend.append(swatch, document.createTextNode(name));
    });
    head.append(legend);
    const canvas = element("canvas");
    box.append(head, canvas);
    chartBox.append(box);
    charts[k] = new LineChart(canvas, { series, ...opts });
  }
  el.append(tileBox, chartBox);
  $("instances").append(el);
  view = { el, tiles, charts, history: [] };
  instances.set(inst.id, view);
  return view;
}

function set(view, k, value, sub) {
  view.tiles[k].value.textContent = value;
  view.tiles[k].sub.textContent = sub || "\u00a0";
}

function update(inst, t) {
  const view = instanceView(inst);
  view.history.push({ t, ...inst });
  while (view.history.length > 2 && view.history[1].t <= t - RATE_SECONDS) view.history.shift();
  const base = view.history[0];
  const dt = t - base.t;
  const rate = (k) => (dt > 0 ? (inst[k] - base[k]) / dt : null);
  const ratio = (num, den) => {
    const d = inst[den] - base[den];
    return d > 0 ? (inst[num] - base[num]) / d : null;
  };
  const tokS = rate("generation_tokens_total");
  const preemptS = rate("preemptions_total");
  const prefixNow = ratio("prefix_cache_hits_total", "prefix_cache_queries_total");
  const prefixAll = inst.prefix_cache_queries_total ? inst.prefix_cache_hits_total / inst.prefix_cache_queries_total : null;
  const specNow = ratio("spec_accepted_tokens_total", "spec_draft_tokens_total");
  const specAll = inst.spec_draft_tokens_total ? inst.spec_accepted_tokens_total / inst.spec_draft_tokens_total : null;
  const L = inst.latency || {};
  const ttft = L.ttft || {}, tpot = L.tpot || {};
  const req = inst.requests_total || {};
  const done = Object.values(req).reduce((a, b) => a + b, 0);

  set(view, "tok_s", tokS === null ? "–" : fmt(tokS, 1), `${inst.generation_tokens_total} generated`);
  set(view, "running", String(inst.running ?? "–"));
  set(view, "waiting", String(inst.waiting ?? "–"));
  set(view, "kv", pct(inst.kv_cache_usage), `${inst.kv_cache_blocks_used ?? "–"} / ${inst.kv_cache_blocks_total ?? "–"} blocks`);
  set(view, "prefix", inst.prefix_cache_enabled === false ? "off" : pct(prefixNow ?? prefixAll),
      `since start ${pct(prefixAll)}`);
  set(view, "spec", inst.speculation_enabled ? pct(specNow ?? specAll) : "off",
      inst.speculation_enabled ? `${fmt(inst.spec_mean_accepted_length, 2)} accepted / step` : "no speculator");
  set(view, "preempt", String(inst.preemptions_total), `${fmt(preemptS, 2)} / s`);
  set(view, "ttft", ms(ttft.p50), `p90 ${ms(ttft.p90)} · p99 ${ms(ttft.p99)}`);
  set(view, "tpot", ms(tpot.p50), `p90 ${ms(tpot.p90)} · p99 ${ms(tpot.p99)}`);
  set(view, "requests", String(done),
      Object.entries(req).filter(([k]) => k !== "success").map(([k, v]) => `${v} ${k}`).join(" · ") || "all succeeded");

  const c = view.charts;
  const p = (v) => (v === null || v === undefined ? null : 100 * v);
  c.tok_s.push(t, [tokS]);
  c.reqs.push(t, [inst.running, inst.waiting]);
  c.kv.push(t, [p(inst.kv_cache_usage)]);
  c.prefix.push(t, [p(prefixNow)]);
  c.spec.push(t, [p(specNow)]);
  c.preempt.push(t, [preemptS]);
  c.ttft.push(t, [ttft.p50, ttft.p90, ttft.p99]);
  const toMs = (v) => (v === null || v === undefined ? null : 1000 * v);
  c.tpot.push(t, [toMs(tpot.p50), toMs(tpot.p90), toMs(tpot.p99)]);
}

function status(ok, text) {
  const s = $("status");
  s.replaceChildren(element("span", `status-dot ${ok ? "live" : "down"}`), document.createTextNode(text));
}

function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

const GROUPS = [
  ["Model", ["served_model_name", "model", "parameters", "dtype", "quantization", "kv_cache_dtype", "max_model_len",
             "kv_cache_blocks", "kv_cache_tokens", "num_layers"]],
  ["Software and machine", ["kvloom_version", "torch_version", "torch_threads", "cpu_model", "cpu_count", "python",
                            "platform"]],
];

function show(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number" && v >= 1e6) return `${(v / 1e6).toFixed(1)} M (${v})`;
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function table(title, entries) {
  const sec = element("section");
  sec.dataset.group = title;
  sec.append(element("h3", "", title));
  const tab = element("table");
  for (const [k, v] of entries) {
    const tr = element("tr");
    tr.append(element("td", "", k), element("td", "", show(v)));
    tab.append(tr);
  }
  sec.append(tab);
  return sec;
}

async function loadStack() {
  const resp = await apiFetch("/server_info");
  if (!resp.ok) throw new Error(await errorMessage(resp));
  const info = await resp.json();
  const used = new Set(["engine_config"]);
  const sections = GROUPS.map(([title, keys]) => {
    keys.forEach((k) => used.add(k));
    return table(title, keys.filter((k) => k in info).map((k) => [k, info[k]]));
  });
  const config = info.engine_config || {};
  sections.push(table("Engine, scheduler and kernels", Object.entries(config).sort()));
  const other = Object.entries(info).filter(([k]) => !used.has(k));
  if (other.length) sections.push(table("Other", other));
  $("stack").replaceChildren(...sections);
}

let stackLoaded = false;
let stopped = false;

async function poll() {
  try {
    const resp = await apiFetch("/dashboard/stats");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const stats = await resp.json();
    for (const inst of stats.instances) update(inst, stats.time);
    status(true, `live · ${new Date(stats.time * 1000).toLocaleTimeString()}`);
    banner("");
    if (!stackLoaded) {
      stackLoaded = true;
      loadStack().catch((e) => { stackLoaded = false; banner(`server_info: ${e.message}`); });
    }
  } catch (e) {
    if (e instanceof Unauthorized) { stopped = true; banner("An API key is needed to read this server's figures. Reload to enter it."); }
    else banner(`cannot reach the server: ${e.message}`);
    status(false, "disconnected");
  }
  if (!stopped) setTimeout(poll, POLL_MS);
}

window.addEventListener("resize", () => { for (const v of instances.values()) for (const c of Object.values(v.charts)) c.draw(); });
poll();
