// Offline latent dashboards: reads data/*.json written by `hsae-runtime features` (no network
// beyond this folder). Table: sortable (click a header), searchable (id or token text). Panel:
// one latent's contexts at a chosen budget (tokens shaded by activation; only ranks < k count),
// quantile samples, rank histogram, density vs budget, logit lens and decoder neighbours.
// Budget view: cached example texts and a slider over k showing the latents each token keeps.
"use strict";

const state = { meta: null, rows: [], byId: new Map(), tokens: {}, examples: [], chunks: new Map(),
  sort: { key: "id", dir: 1 }, query: "", selected: null, budgetIndex: 0, picked: 0 };

function $(id) { return document.getElementById(id); }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
function tok(id) {
  const t = state.tokens[String(id)];
  return t === undefined ? "#" + id : t.replace(/\n/g, "⏎");
}
function pct(d) { return (100 * d).toFixed(d >= 0.001 ? 2 : 4) + "%"; }
function label(id) {
  const row = state.byId.get(id);
  if (!row) return "";
  const words = row.top_tokens.length ? row.top_tokens : row.lens_tokens;
  return words.slice(0, 3).map((w) => JSON.stringify(w)).join(" | ");
}
async function getJSON(path) {
  const res = await fetch(path);
  if (!res.ok) throw new Error(path + ": HTTP " + res.status);
  return res.json();
}

// ---------------------------------------------------------------- table
function columns() {
  const cols = [{ key: "id", title: "latent", num: true, get: (r) => r.id },
    { key: "first", title: "first k", num: true, get: (r) => r.first_budget || Infinity,
      show: (r) => (r.first_budget ? String(r.first_budget) : "–") }];
  state.meta.budgets.forEach((b, i) => cols.push({ key: "d" + b, title: "density@" + b, num: true,
    get: (r) => r.density[i], show: (r) => pct(r.density[i]) }));
  cols.push({ key: "max", title: "max act", num: true, get: (r) => r.max, show: (r) => r.max.toFixed(2) });
  cols.push({ key: "top", title: "top tokens", get: (r) => r.top_tokens.join(" "),
    show: (r) => r.top_tokens.map((w) => JSON.stringify(w)).join(" ") });
  cols.push({ key: "lens", title: "logit lens", get: (r) => r.lens_tokens.join(" "),
    show: (r) => r.lens_tokens.map((w) => JSON.stringify(w)).join(" ") });
  return cols;
}
function renderHead() {
  const head = $("latents-head");
  head.replaceChildren();
  for (const c of columns()) {
    const cls = state.sort.key === c.key ? (state.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : "";
    head.append(el("th", { class: cls, "data-key": c.key, text: c.title, onclick: () => {
      state.sort = { key: c.key, dir: state.sort.key === c.key ? -state.sort.dir : (c.num && c.key !== "id" ? -1 : 1) };
      renderHead(); renderBody();
    } }));
  }
}
function renderBody() {
  const cols = columns();
  const col = cols.find((c) => c.key === state.sort.key) || cols[0];
  const q = state.query.trim().toLowerCase();
  let rows = state.rows;
  if (q) {
    rows = rows.filter((r) => String(r.id) === q || r.top_tokens.some((w) => w.toLowerCase().includes(q))
      || r.lens_tokens.some((w) => w.toLowerCase().includes(q)));
  }
  rows = rows.slice().sort((a, b) => {
    const x = col.get(a), y = col.get(b);
    return (x < y ? -1 : x > y ? 1 : a.id - b.id) * state.sort.dir;
  });
  const body = document.querySelector("#latents tbody");
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = el("tr", { "data-id": String(r.id), onclick: () => openLatent(r.id) });
    if (r.id === state.selected) tr.className = "selected";
    for (const c of cols) {
      tr.append(el("td", { class: (c.num ? "num" : "tok"), text: c.show ? c.show(r) : String(c.get(r)) }));
    }
    frag.append(tr);
  }
  body.replaceChildren(frag);
  $("count").textContent = rows.length + " of " + state.rows.length + " latents";
}

// ---------------------------------------------------------------- latent panel
async function record(id) {
  const n = Math.floor(id / state.meta.chunk);
  if (!state.chunks.has(n)) {
    state.chunks.set(n, getJSON("data/latents/" + String(n).padStart(4, "0") + ".json"));
  }
  return (await state.chunks.get(n))[id % state.meta.chunk];
}
function contextLine(ctx, k, scale) {
  const line = el("div", { class: "ctx" });
  ctx.t.forEach((t, j) => {
    const on = ctx.r[j] >= 0 && ctx.r[j] < k;
    const v = on ? ctx.v[j] : 0;
    const span = el("span", { text: tok(t), title: on ? "act " + v.toFixed(3) + ", rank " + (ctx.r[j] + 1) : "" });
    if (v > 0) span.style.background = "rgba(230, 126, 34, " + Math.min(1, v / scale).toFixed(3) + ")";
    if (j === ctx.at) span.classList.add("fire");
    line.append(span);
  });
  const r = ctx.r[ctx.at];
  line.append(el("span", { class: "val", text: ctx.v[ctx.at].toFixed(3) + " @rank " + (r + 1) }));
  return line;
}
function barChart(values, opts) {
  const w = opts.width || 320, h = opts.height || 120, pad = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  const max = Math.max(1e-12, ...values);
  const bw = (w - pad - 4) / values.length;
  values.forEach((v, i) => {
    const bh = (h - pad - 6) * v / max;
    const rect = document.createElementNS(svg.namespaceURI, "rect");
    rect.setAttribute("x", pad + i * bw); rect.setAttribute("y", h - pad - bh);
    rect.setAttribute("width", Math.max(1, bw - 1)); rect.setAttribute("height", bh);
    rect.setAttribute("fill", opts.mark && opts.mark(i) ? "#2b5fd9" : "#9db4e8");
    svg.append(rect);
  });
  const text = (x, y, s) => { const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = s; svg.append(t); };
  text(pad, h - 8, opts.xlabel || ""); text(2, 10, opts.ylabel || "");
  return svg;
}
function lineChart(xs, ys, opts) {
  const w = 320, h = 120, pad = 26;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  const lx = xs.map((x) => Math.log2(x));
  const x0 = Math.min(...lx), x1 = Math.max(...lx, x0 + 1), ymax = Math.max(1e-12, ...ys);
  const px = (x) => pad + (w - pad - 8) * (Math.log2(x) - x0) / (x1 - x0);
  const py = (y) => h - pad - (h - pad - 8) * y / ymax;
  const pts = xs.map((x, i) => px(x).toFixed(1) + "," + py(ys[i]).toFixed(1)).join(" ");
  const poly = document.createElementNS(svg.namespaceURI, "polyline");
  poly.setAttribute("points", pts); poly.setAttribute("fill", "none"); poly.setAttribute("stroke", "#2b5fd9");
  svg.append(poly);
  xs.forEach((x, i) => {
    const c = document.createElementNS(svg.namespaceURI, "circle");
    c.setAttribute("cx", px(x)); c.setAttribute("cy", py(ys[i])); c.setAttribute("r", 3);
    c.setAttribute("fill", "#2b5fd9"); svg.append(c);
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", px(x) - 4); t.setAttribute("y", h - 12); t.textContent = String(x); svg.append(t);
  });
  const t = document.createElementNS(svg.namespaceURI, "text");
  t.setAttribute("x", 2); t.setAttribute("y", 10); t.textContent = opts.ylabel + " (max " + pct(ymax) + ")";
  svg.append(t);
  return svg;
}
async function openLatent(id) {
  state.selected = id;
  document.querySelectorAll("#latents tbody tr.selected").forEach((tr) => tr.classList.remove("selected"));
  const tr = document.querySelector('#latents tbody tr[data-id="' + id + '"]');
  if (tr) tr.classList.add("selected");
  const rec = await record(id);
  renderPanel(rec);
}
function renderPanel(rec) {
  const budgets = state.meta.budgets, bi = state.budgetIndex, k = budgets[bi];
  const panel = $("panel");
  panel.replaceChildren();
  panel.append(el("h2", { text: "Latent " + rec.id }));
  panel.append(el("div", { class: "muted", text: "first budget: " + (rec.first_budget || "never fires")
    + " · density@" + k + ": " + pct(rec.density[bi]) + " · mean " + rec.mean[bi].toFixed(3)
    + " · max " + rec.max[bi].toFixed(3) }));
  const bar = el("div", { class: "budgets" }, "budget k: ");
  budgets.forEach((b, i) => bar.append(el("button", { class: i === bi ? "active" : "", text: String(b),
    onclick: () => { state.budgetIndex = i; renderPanel(rec); } })));
  panel.append(bar);
  panel.append(el("h3", { text: "Top contexts at k = " + k }));
  const box = el("div", { id: "contexts" });
  const scale = Math.max(1e-9, rec.max[bi]);
  if (!rec.top[bi].length) box.append(el("p", { class: "muted", text: "Never fires at this budget." }));
  for (const j of rec.top[bi]) box.append(contextLine(rec.contexts[j], k, scale));
  panel.append(box);
  panel.append(el("h3", { text: "Samples from activation quantiles (at k = " + state.meta.k + ", firing at this k)" }));
  for (const q of rec.quantiles) {
    const shown = q.contexts.map((j) => rec.contexts[j]).filter((c) => c.r[c.at] < k);
    panel.append(el("div", { class: "muted", text: "interval " + q.lo.toFixed(3) + " – " + q.hi.toFixed(3)
      + " (" + (100 * q.share).toFixed(1) + "% of firings)" }));
    for (const c of shown) panel.append(contextLine(c, k, scale));
  }
  panel.append(el("h3", { text: "Rank histogram and density vs budget" }));
  panel.append(el("div", { class: "plots" },
    barChart(rec.rank_hist, { xlabel: "rank 1…" + state.meta.k + " (dark: inside k = " + k + ")",
      ylabel: "firings", mark: (i) => i < k }),
    lineChart(budgets, rec.density, { ylabel: "density" })));
  panel.append(el("h3", { text: "Logit lens (final norm + unembedding)" }));
  const table = (title, items) => {
    const t = el("table", {}, el("tr", {}, el("th", { text: title }), el("th", { text: "logit" })));
    for (const [id, v] of items) t.append(el("tr", {}, el("td", { class: "tok", text: JSON.stringify(tok(id)) }),
      el("td", { class: "num", text: v.toFixed(3) })));
    return t;
  };
  panel.append(el("div", { class: "lens" }, table("promotes", rec.lens.top), table("suppresses", rec.lens.bottom)));
  panel.append(el("h3", { text: "Nearest latents (decoder cosine)" }));
  const near = el("div", {});
  for (const [j, c] of rec.neighbours) {
    near.append(el("a", { class: "latent", text: String(j), onclick: () => openLatent(j) }),
      el("span", { class: "muted", text: " " + c.toFixed(3) + " " + label(j) + "   " }));
  }
  panel.append(near);
}

// ---------------------------------------------------------------- budget slider
function renderExample() {
  const ex = state.examples[Number($("example").value) || 0];
  const k = Number($("k-slider").value);
  $("k-value").textContent = String(k);
  const text = $("example-text");
  text.replaceChildren();
  if (!ex) return;
  const used = new Set();
  ex.t.forEach((t, j) => {
    for (let r = 0; r < k; r++) if (ex.v[j][r] > 0) used.add(ex.i[j][r]);
    const span = el("span", { text: tok(t), onclick: () => { state.picked = j; renderExample(); } });
    if (j === state.picked) span.classList.add("picked");
    text.append(span);
  });
  $("k-summary").textContent = used.size + " distinct latents kept by this text at k = " + k;
  const box = $("token-latents");
  box.replaceChildren(el("h3", { text: "Latents kept by " + JSON.stringify(tok(ex.t[state.picked])) + " at k = " + k
    + " (highlighted: entered at this k)" }));
  for (let r = 0; r < k; r++) {
    const v = ex.v[state.picked][r], id = ex.i[state.picked][r];
    if (!(v > 0)) break;
    box.append(el("span", { class: "chip" + (r === k - 1 ? " new" : ""), text: "#" + (r + 1) + " latent " + id
      + " (" + v.toFixed(2) + ") " + label(id), onclick: () => { showView("latents"); openLatent(id); } }));
  }
}
function showView(name) {
  for (const v of ["latents", "budget"]) {
    $("view-" + v).classList.toggle("hidden", v !== name);
    $("tab-" + v).classList.toggle("active", v === name);
  }
}

async function main() {
  const [meta, rows, tokens, examples] = await Promise.all([getJSON("data/meta.json"),
    getJSON("data/summary.json"), getJSON("data/tokens.json"), getJSON("data/examples.json")]);
  Object.assign(state, { meta, rows, tokens, examples, budgetIndex: meta.budgets.length - 1 });
  rows.forEach((r) => state.byId.set(r.id, r));
  $("meta").textContent = meta.sae + " · " + meta.lm + " · " + meta.hookpoint + " · d_sae " + meta.d_sae
    + " · k_max " + meta.k + " · " + meta.tokens + " tokens of " + meta.data + " · L0 at k=" + meta.budgets.join("/")
    + ": " + meta.l0.map((x) => x.toFixed(1)).join("/");
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showView(b.dataset.view)));
  $("search").addEventListener("input", (e) => { state.query = e.target.value; renderBody(); });
  examples.forEach((ex, i) => $("example").append(el("option", { value: String(i),
    text: "text " + (i + 1) + ": " + ex.t.slice(1, 9).map(tok).join("").slice(0, 40) })));
  $("k-slider").max = String(meta.k);
  $("k-slider").value = String(Math.min(8, meta.k));
  $("k-slider").addEventListener("input", renderExample);
  $("example").addEventListener("change", () => { state.picked = 0; renderExample(); });
  renderHead();
  renderBody();
  renderExample();
  document.body.dataset.ready = "1";
}
main().catch((err) => { console.error(err); $("meta").textContent = "failed to load: " + err; });
