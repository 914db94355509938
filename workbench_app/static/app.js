// The workbench page: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
};
const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs = {}) => {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};
const fmt = (p) => (p === null || p === undefined ? "–" : p >= 0.001 || p === 0 ? p.toFixed(3) : p.toExponential(1));
const short = (fp) => (fp ? fp.slice(0, 16) + "…" : "");

const state = {
  model: null,        // the open model's description
  trace: null,        // the last trace result
  site: null,         // {kind, layer, token, fact_token}
  suggested: null,
  editJob: null,
  lastEdit: null,     // the last edit job's record
  undone: {},         // edit id -> what its undo reported
  studies: null,      // the studies that can be started
  run: null,          // the run shown on the Studies page
  filters: {},        // facet -> value shown
  studyFollowing: null,
  unitsFor: null,     // the model whose units form is filled in
};

// --- talking to the server ---------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

let toastTimer = null;
function toast(message, kind = "error") {
  const t = $("#toast");
  t.textContent = message;
  t.className = "toast" + (kind === "info" ? " info" : "");
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, kind === "info" ? 3000 : 9000);
}

async function guarded(button, fn) {
  if (button) button.disabled = true;
  try { return await fn(); } catch (e) { toast(e.message); return null; } finally { if (button) button.disabled = false; }
}

// Follow a job with server-sent events; resolves with its record when it ends.
function follow(jobId, box, onCancel) {
  return new Promise((resolve) => {
    box.hidden = false;
    box.replaceChildren();
    const bar = el("i", { style: "width:0%" });
    const msg = el("span", { class: "msg", text: "queued" });
    const cancel = el("button", { class: "cancel", text: "Cancel" });
    cancel.addEventListener("click", async () => {
      try { await api("POST", `/api/jobs/${jobId}/cancel`); } catch (e) { toast(e.message); }
      if (onCancel) onCancel();
    });
    box.append(el("div", { class: "progress" }, bar), msg, cancel);
    const source = new EventSource(`/api/jobs/${jobId}/events`);
    const finish = async () => {
      source.close();
      cancel.remove();
      try { resolve(await api("GET", `/api/jobs/${jobId}`)); } catch (e) { toast(e.message); resolve(null); }
    };
    source.addEventListener("state", (ev) => {
      const s = JSON.parse(ev.data);
      bar.style.width = `${Math.round(100 * s.progress)}%`;
      msg.textContent = s.status === "running" || s.status === "queued" ? s.message : s.status;
      cancel.disabled = !s.cancellable;
    });
    source.addEventListener("end", finish);
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) finish(); };
  });
}

// --- pages -------------------------------------------------------------------------------

function showPage(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.page === name);
  $("#page-model").hidden = name !== "model";
  $("#page-edit").hidden = name !== "edit";
  $("#page-studies").hidden = name !== "studies";
  $("#page-units").hidden = name !== "units";
  localStorage.setItem("wb.page", name);
  if (name === "studies") guarded(null, loadStudies);
  if (name === "units") guarded(null, loadUnits);
}

async function loadChoices() {
  const data = await api("GET", "/api/models");
  const select = $("#model-select");
  select.replaceChildren();
  for (const z of data.zoo) select.append(el("option", { value: z.spec, text: z.spec }));
  if (!data.zoo.length) select.append(el("option", { value: "", text: "no trained zoo model" }));
  const list = $("#folder-list");
  list.replaceChildren(...data.folders.map((f) => el("option", { value: f })));
  return data;
}

async function openModel(body) {
  const info = await api("POST", "/api/models", body);
  localStorage.setItem("wb.model", JSON.stringify(body));
  renderModel(info);
  return info;
}

async function refreshModel() {
  if (!state.model) return;
  renderModel(await api("GET", `/api/models/${state.model.key}`));
}

function kv(table, rows) {
  table.replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v instanceof Node ? v : String(v)))));
}

function renderModel(info) {
  state.model = info;
  $("#current-model").textContent = `${info.spec} · ${info.stack.length} edit(s)`;
  $("#model-details").hidden = false;
  const a = info.architecture;
  kv($("#arch"), [["family", a.family], ["kind", info.kind], ["layers", a.n_layers], ["d_model", a.d_model],
    ["d_mlp", a.d_mlp], ["heads", a.n_heads], ["vocabulary", a.vocab_size], ["parameters", a.n_params.toLocaleString()]]);
  const rec = info.info || {};
  kv($("#record"), [["accuracy", info.accuracy === null || info.accuracy === undefined ? "not recorded" : (100 * info.accuracy).toFixed(2) + "%"],
    ["prefixed accuracy", rec.prefixed_accuracy !== undefined ? (100 * rec.prefixed_accuracy).toFixed(2) + "%" : null],
    ["facts", rec.n_facts], ["subjects", rec.n_subjects], ["seed", rec.seed], ["trained in", rec.train_seconds ? rec.train_seconds + " s" : null],
    ["classes", info.classes.length ? info.classes.join(", ") : null],
    ["shipped editor options", Object.keys(info.editor_defaults).join(", ") || null]]);
  $("#fingerprint").textContent = info.fingerprint;
  $("#original-fingerprint").textContent = info.original_fingerprint;
  const same = info.fingerprint === info.original_fingerprint;
  $("#weights-state").replaceChildren(el("span", { class: "badge " + (same ? "good" : "meh"), id: "weights-badge",
    text: same ? "unedited" : `${info.stack.length} edit(s) applied` }));
  renderStack(info.stack);
  $("#site-count").textContent = `${info.sites.length} canonical, ${info.n_module_sites} modules`;
  $("#sites").replaceChildren(...info.sites.map((s) => el("code", { title: `${s.module_path} [${s.side}]`, text: s.name })));
  state.unitsFor = state.unitsFor === info.key ? info.key : null;
  if (!$("#page-units").hidden) guarded(null, loadUnits);
  $("#edit-needs-model").hidden = info.can_edit_facts;
  $("#edit-body").hidden = !info.can_edit_facts;
  if (!info.can_edit_facts) $("#edit-needs-model").textContent =
    `${info.spec} is a ${info.kind}; knowledge editing needs a causal language model (zoo:factgpt).`;
}

function renderStack(stack) {
  $("#stack-count").textContent = String(stack.length);
  if (!stack.length) { $("#stack").replaceChildren(el("p", { class: "hint", text: "No edits: the weights are the original ones." })); return; }
  const rows = stack.map((e, i) => {
    const last = i === stack.length - 1;
    const undo = el("button", { class: "undo", "data-edit": e.id, text: "Undo" });
    undo.disabled = !last;
    undo.title = last ? "revert exactly this delta" : "undo the later edits first";
    undo.addEventListener("click", () => guarded(undo, () => undoEdit(e.id)));
    const rw = e.rewrite || {};
    const what = e.rewrite ? `${(rw.prompt || "").replace("{}", rw.subject || "")} → ${rw.target_new || ""} (was ${rw.target_true || "?"})`
      : e.summary || "";
    return el("tr", {}, el("td", { text: String(i + 1) }), el("td", { text: e.method }), el("td", { class: "num", text: String(e.layer) }),
      el("td", { text: what }),
      el("td", {}, el("code", { text: short(e.fingerprint_after) })),
      el("td", {}, el("a", { href: `/api/models/${state.model.key}/edits/${e.id}/delta`, text: "delta" })), el("td", {}, undo));
  });
  $("#stack").replaceChildren(el("table", { class: "list", id: "stack-table" },
    el("tr", {}, ...["#", "method", "layer / site", "edit", "fingerprint after", "file", ""].map((h) => el("th", { text: h }))), ...rows));
}

async function undoEdit(id) {
  const r = await api("DELETE", `/api/models/${state.model.key}/edits/${id}`);
  const box = $("#undo-result");
  const text = `undone ${r.undone.method} edit: fingerprint ${short(r.fingerprint)} — ` +
    (r.bit_exact ? "bit-exact revert" : "NOT the pre-edit weights") + (r.original ? ", equal to the unedited model" : "");
  state.undone[id] = { text, ok: r.bit_exact };
  if (box) box.replaceChildren(el("span", { class: r.bit_exact ? "ok" : "no", text }));
  toast(text, "info");
  await refreshModel();
  if (state.lastEdit) renderResult(state.lastEdit);
}

// --- knowledge editing -------------------------------------------------------------------

function request() {
  const body = { prompt: $("#prompt").value, subject: $("#subject").value };
  if ($("#target").value.trim()) body.target = $("#target").value;
  if ($("#target-true").value.trim()) body.target_true = $("#target-true").value;
  return body;
}

async function fillExample() {
  const seed = Number(localStorage.getItem("wb.exampleSeed") || "0");
  const ex = await api("GET", `/api/models/${state.model.key}/example?seed=${seed}`);
  localStorage.setItem("wb.exampleSeed", String(seed + 1));
  $("#prompt").value = ex.prompt; $("#subject").value = ex.subject; $("#target").value = ex.target;
  $("#target-true").value = ex.target_true;
  await showAnswers();
}

async function showAnswers() {
  const data = await api("POST", `/api/models/${state.model.key}/answers`, request());
  const top = data.answers[0] ? data.answers[0].p : 1;
  $("#answers").replaceChildren(el("div", { class: "hint", text: `after “${data.text}”` }),
    ...data.answers.slice(0, 8).map((a) => el("div", { class: "answer" }, el("code", { text: a.token }),
      el("div", { class: "bar" }, el("i", { style: `width:${Math.max(1, 100 * a.p / top)}%` })), el("span", { class: "p", text: fmt(a.p) }))));
  if (data.suggested) {
    state.suggested = data.suggested;
    if (!$("#should-change").disabled) {
      $("#should-change").value = data.suggested.paraphrases.join("\n");
      $("#should-not-change").value = data.suggested.neighbours.join("\n");
    }
    if (!$("#target-true").value.trim() && data.rewrite) $("#target-true").value = data.rewrite.target_true;
  }
  return data;
}

async function runTrace() {
  const body = request();
  const traceBody = { prompt: body.prompt, subject: body.subject };
  if (body.target_true) traceBody.target_true = body.target_true;
  const { job } = await api("POST", `/api/models/${state.model.key}/trace`, traceBody);
  localStorage.setItem("wb.traceJob", job.id);
  const rec = await follow(job.id, $("#trace-job"));
  if (rec && rec.state.status === "done") renderTrace(rec.result);
  else if (rec) toast(`trace ${rec.state.status}${rec.state.error ? ": " + rec.state.error : ""}`, rec.state.status === "cancelled" ? "info" : "error");
}

const KIND_COLOR = { hidden: "88, 60, 168", mlp: "31, 122, 86", attn: "192, 64, 52" };
const KIND_NAME = { hidden: "hidden state (residual)", mlp: "MLP output", attn: "attention output" };

function renderTrace(trace) {
  state.trace = trace;
  state.site = null;
  const box = $("#heatmaps");
  box.replaceChildren();
  const [s0, s1] = trace.subject_span;
  const nTok = trace.tokens.length, nLay = trace.n_layers;
  const cw = Math.max(22, Math.min(40, Math.floor(420 / nLay))), ch = 22, left = 96, top = 8, bottom = 30;
  const tip = $("#tooltip");
  const kinds = ["hidden", "mlp", "attn"].filter((k) => k in trace.scores);
  for (const kind of kinds) {
    const scores = trace.scores[kind];
    const lo = trace.corrupted_prob, hi = Math.max(trace.clean_prob, ...scores.flat());
    const w = left + nLay * cw + 4, h = top + nTok * ch + bottom;
    const root = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, "data-kind": kind });
    trace.tokens.forEach((tok, t) => {
      const label = svg("text", { x: left - 6, y: top + t * ch + ch / 2 + 4, "text-anchor": "end",
        class: t >= s0 && t < s1 ? "subject" : "" });
      label.textContent = (t >= s0 && t < s1 ? "*" : "") + tok.trim().slice(0, 12);
      root.append(label);
      for (let L = 0; L < nLay; L++) {
        const v = scores[t][L];
        const a = hi > lo ? Math.max(0, Math.min(1, (v - lo) / (hi - lo))) : 0;
        const rect = svg("rect", { x: left + L * cw, y: top + t * ch, width: cw, height: ch, class: "cell",
          fill: `rgba(${KIND_COLOR[kind]}, ${(0.04 + 0.96 * a).toFixed(3)})`,
          "data-kind": kind, "data-layer": L, "data-token": t });
        rect.addEventListener("mousemove", (ev) => {
          tip.hidden = false;
          tip.textContent = `${kind} · layer ${L} · “${tok}”: restored p ${fmt(v)}, effect ${fmt(v - lo)}`;
          tip.style.left = `${ev.clientX + 14}px`; tip.style.top = `${ev.clientY + 12}px`;
        });
        rect.addEventListener("mouseleave", () => { tip.hidden = true; });
        rect.addEventListener("click", () => chooseSite(kind, L, t));
        root.append(rect);
      }
    });
    for (let L = 0; L < nLay; L++) {
      const lab = svg("text", { x: left + L * cw + cw / 2, y: top + nTok * ch + 14, "text-anchor": "middle" });
      lab.textContent = String(L);
      root.append(lab);
    }
    const peak = trace.peaks[kind];
    const title = el("h4", { text: `${KIND_NAME[kind] || kind} · peak layer ${peak.layer} at “${peak.token_text.trim()}”` });
    box.append(el("div", { class: "heatmap" }, title, root));
  }
  box.append(el("p", { class: "hint", text: `p(${trace.target.trim()}) clean ${fmt(trace.clean_prob)}, subject corrupted ${fmt(trace.corrupted_prob)}; ` +
    `${trace.n_samples} noise samples, window ${trace.window}, seed ${trace.seed}` }));
  renderSite();
}

function chooseSite(kind, layer, token) {
  const last = state.trace.tokens.length - 1;
  state.site = { kind, layer, token, fact_token: token === last ? "prompt_last" : "subject_last" };
  for (const r of document.querySelectorAll("rect.cell.chosen")) r.classList.remove("chosen");
  const r = document.querySelector(`rect.cell[data-kind="${kind}"][data-layer="${layer}"][data-token="${token}"]`);
  if (r) r.classList.add("chosen");
  renderSite();
}

function renderSite() {
  const box = $("#site");
  if (!state.site) { box.className = "site"; box.textContent = "no edit site chosen: click a cell of a heatmap"; return; }
  const s = state.site, tr = state.trace;
  const keyTok = s.fact_token === "prompt_last" ? tr.tokens[tr.tokens.length - 1] : tr.tokens[tr.subject_span[1] - 1];
  box.className = "site chosen";
  box.textContent = `edit site: MLP of layer ${s.layer}, key read at “${keyTok.trim()}” (${s.fact_token.replace("_", " ")}); ` +
    `chosen from the ${s.kind} cell at “${tr.tokens[s.token].trim()}”`;
}

function lines(id) { return $(id).value.split("\n").map((x) => x.trim()).filter(Boolean); }

function setFrozen(frozen) {
  for (const id of ["#method", "#should-change", "#should-not-change", "#expect-p", "#expect-change", "#expect-keep", "#note"])
    $(id).disabled = frozen;
  $("#btn-predict").hidden = frozen;
  $("#btn-new-prediction").hidden = !frozen;
}

async function submitPrediction(ev) {
  ev.preventDefault();
  if (!state.site) { toast("choose the edit site first: click a cell of the causal trace"); return; }
  const body = { ...request(), method: $("#method").value, layer: state.site.layer, fact_token: state.site.fact_token,
    prediction: { should_change: lines("#should-change"), should_not_change: lines("#should-not-change"), note: $("#note").value,
      expect: { prompt_p_new_min: Number($("#expect-p").value), change_share_min: Number($("#expect-change").value),
        keep_share_min: Number($("#expect-keep").value) } } };
  const btn = $("#btn-predict");
  btn.disabled = true;
  let started;
  try { started = await api("POST", `/api/models/${state.model.key}/edits`, body); }
  catch (e) { toast(e.message); btn.disabled = false; return; }
  btn.disabled = false;
  setFrozen(true);
  $("#prediction-hash").replaceChildren("prediction frozen · sha256 ", el("code", { id: "prediction-sha", text: started.prediction_sha256 }));
  localStorage.setItem("wb.editJob", started.job.id);
  $("#result").replaceChildren(el("p", { class: "hint", text: "editing…" }));
  const rec = await follow(started.job.id, $("#edit-job"));
  if (rec) {
    state.lastEdit = rec;
    if (rec.state.status === "done") await refreshModel();
    renderResult(rec);
  }
}

function pct(x) { return x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`; }

function renderResult(rec) {
  const box = $("#result");
  const r = rec.result;
  if (rec.state.status !== "done" || !r) {
    box.replaceChildren(el("p", { class: rec.state.status === "cancelled" ? "hint" : "no",
      text: `edit ${rec.state.status}${rec.state.error ? ": " + rec.state.error : ""}` }));
    return;
  }
  const parts = [];
  parts.push(el("div", { class: "verdict" }, "verdict", el("span", { class: `badge ${r.verdict}`, id: "verdict", text: r.verdict }),
    el("span", { class: "hint", text: r.refused ? `refused: ${r.refused}` : `${r.edit.method} at layer ${r.edit.layer}, update norm ${r.update_norm.toFixed(3)}` })));
  if (r.clauses.length) {
    parts.push(el("table", { class: "list", id: "clauses" },
      el("tr", {}, ...["prediction", "predicted", "measured", "before the edit", ""].map((h) => el("th", { text: h }))),
      ...r.clauses.map((c) => el("tr", {}, el("td", { text: c.what }), el("td", { class: "num", text: fmt(c.predicted) }),
        el("td", { class: "num", text: fmt(c.measured) }), el("td", { class: "num", text: fmt(c.before) }),
        el("td", {}, c.holds === null ? el("span", { class: "hint", text: "no prompts" }) : el("span", { class: c.holds ? "ok" : "no", text: c.holds ? "✓ holds" : "✗ fails" }))))));
  }
  const rows = [];
  const group = (name, label) => r.before[name].forEach((b, i) => {
    const a = r.after[name][i];
    const d = a.p_new - b.p_new;
    rows.push(el("tr", {}, el("td", { class: "hint", text: label }), el("td", { text: b.prompt }),
      el("td", { class: "num" }, `${fmt(b.p_new)} → `, el("b", { class: d > 0.01 ? "delta-up" : d < -0.01 ? "delta-down" : "", text: fmt(a.p_new) })),
      el("td", { class: "num", text: `${fmt(b.p_true)} → ${fmt(a.p_true)}` })));
  });
  group("prompt", "prompt"); group("should_change", "should change"); group("should_not_change", "should not");
  const rw = r.prediction.rewrite;
  parts.push(el("h3", { text: "Measured" }), el("table", { class: "list", id: "measured" },
    el("tr", {}, ...["", "prompt", `P(${rw.target_new}) before → after`, `P(${rw.target_true}) before → after`].map((h) => el("th", { text: h }))), ...rows));
  const cf = (k) => `${pct(r.counterfact_before[k])} → ${pct(r.counterfact_after[k])}`;
  parts.push(el("p", { class: "hint", text: `CounterFact on these prompts: ES ${cf("ES")}, PS ${cf("PS")}, NS ${cf("NS")}` }));
  parts.push(el("div", {}, el("div", { class: "hint", text: "generated (greedy) before / after" }),
    el("div", { class: "gen", text: `${rw.prompt.replace("{}", rw.subject)} ▸ ${r.before.generated}` }),
    el("div", { class: "gen", text: `${rw.prompt.replace("{}", rw.subject)} ▸ ${r.after.generated}` })));
  parts.push(el("p", { class: "hash" }, "prediction sha256 ", el("code", { text: r.prediction_sha256 })));
  if (r.edit) {
    const onStack = state.model && state.model.stack.length && state.model.stack[state.model.stack.length - 1].id === r.edit.id;
    const inStack = state.model && state.model.stack.some((e) => e.id === r.edit.id);
    const undo = el("button", { id: "btn-undo", text: "Undo this edit" });
    undo.disabled = !onStack;
    undo.addEventListener("click", () => guarded(undo, () => undoEdit(r.edit.id)));
    const done = state.undone[r.edit.id];
    const note = done ? el("span", { class: done.ok ? "ok" : "no", text: done.text })
      : inStack ? (onStack ? "" : "later edits are on top of this one") : "this edit was undone";
    parts.push(el("div", { class: "row" }, undo, el("span", { id: "undo-result", class: "hint" }, note)));
  }
  box.replaceChildren(...parts);
}

// --- units -------------------------------------------------------------------------------

async function loadUnits() {
  const ok = state.model && state.model.kind === "image_classifier" && state.model.has_world;
  $("#units-needs-model").hidden = !!ok;
  $("#units-body").hidden = !ok;
  if (!ok || state.unitsFor === state.model.key) return;
  const opts = await api("GET", `/api/models/${state.model.key}/units`);
  state.unitsFor = state.model.key;
  $("#units-trojan").replaceChildren(...opts.trojans.map((t) => el("option", { value: t.name,
    text: `${t.name} · ${t.kind} → ${t.target}${t.source ? " (from " + t.source + ")" : " (any class)"}` })));
  $("#units-site").replaceChildren(el("option", { value: "", text: "every site (slower)" }),
    ...opts.sites.map((s) => el("option", { value: s, text: s })));
  $("#units-site").value = opts.sites.includes("layer2.relu2") ? "layer2.relu2" : "";
  $("#units-method").replaceChildren(...opts.methods.map((m) => el("option", { value: m, text: m.replace("_", " ") })));
}

async function runUnits() {
  const body = { trojan: $("#units-trojan").value, method: $("#units-method").value,
    seed: Number($("#units-seed").value || "0") };
  if ($("#units-site").value) body.site = $("#units-site").value;
  if ($("#units-n").value.trim()) body.n_units = Number($("#units-n").value);
  const { job } = await api("POST", `/api/models/${state.model.key}/units`, body);
  localStorage.setItem("wb.unitsJob", job.id);
  $("#units-result").replaceChildren(el("p", { class: "hint", text: "ranking and ablating…" }));
  const rec = await follow(job.id, $("#units-job"));
  if (rec) renderUnits(rec);
}

function barGroup(title, rows) {
  return el("div", {}, el("h4", { text: title }), ...rows.map(([label, v, cls]) => el("div", { class: "bar-row" },
    el("span", { text: label }), el("div", { class: "bar" }, el("i", { class: cls, style: `width:${Math.max(0.5, 100 * v)}%` })),
    el("span", { class: "v", text: pct(v) }))));
}

function curveChart(curve) {
  const w = 520, h = 220, l = 44, r = 12, t = 10, b = 34;
  const ks = curve.map((c) => c.k), kmax = Math.max(...ks);
  const x = (k) => l + (w - l - r) * (Math.log2(k) / Math.max(1, Math.log2(kmax)));
  const y = (v) => t + (h - t - b) * (1 - v);
  const root = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "curve", id: "units-curve" });
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    root.append(svg("line", { x1: l, x2: w - r, y1: y(v), y2: y(v), class: "axis", "stroke-dasharray": v ? "2 3" : "" }));
    const lab = svg("text", { x: l - 6, y: y(v) + 4, "text-anchor": "end" }); lab.textContent = pct(v); root.append(lab);
  }
  for (const k of ks) {
    const lab = svg("text", { x: x(k), y: h - b + 16, "text-anchor": "middle" }); lab.textContent = String(k); root.append(lab);
  }
  const xl = svg("text", { x: (l + w - r) / 2, y: h - 4, "text-anchor": "middle" }); xl.textContent = "units ablated (in ranking order)"; root.append(xl);
  const series = [["asr", "#3a5bd9", ""], ["random_asr", "#d9a441", ""], ["clean", "#3a5bd9", "5 4"], ["random_clean", "#d9a441", "5 4"]];
  for (const [key, color, dash] of series) {
    root.append(svg("polyline", { points: curve.map((c) => `${x(c.k)},${y(c[key])}`).join(" "), fill: "none", stroke: color,
      "stroke-width": 2, "stroke-dasharray": dash, "data-series": key }));
    for (const c of curve) root.append(svg("circle", { cx: x(c.k), cy: y(c[key]), r: 2.5, fill: color }));
  }
  return el("div", {}, root, el("div", { class: "legend" },
    el("span", {}, el("i", { style: "background:#3a5bd9" }), "attack success, ranked units"),
    el("span", {}, el("i", { style: "background:#d9a441" }), "attack success, random units"),
    el("span", { text: "dashed: clean accuracy" })));
}

function renderUnits(rec) {
  const box = $("#units-result");
  const r = rec.result;
  if (rec.state.status !== "done" || !r) {
    box.replaceChildren(el("p", { class: rec.state.status === "cancelled" ? "hint" : "no",
      text: `units job ${rec.state.status}${rec.state.error ? ": " + rec.state.error : ""}` }));
    return;
  }
  const parts = [];
  const better = r.asr_after < r.random_asr_after;
  parts.push(el("div", { class: "verdict" }, "ranked units vs random",
    el("span", { class: `badge ${better ? "held" : "failed"}`, id: "units-verdict", text: better ? "ranked units cut more" : "no better than random" }),
    el("span", { class: "hint", text: `${r.ranking || r.method} · trojan ${r.trojan} (${r.kind} → ${r.target})` })));
  const units = Object.entries(r.units_by_site).map(([site, us]) => el("div", { class: "unit-list" }, el("b", { text: `${site}: ` }),
    ...us.map((u) => el("code", { text: String(u) }))));
  parts.push(el("div", { class: "hint", text: `${r.n_units} unit(s) ablated (set to their clean mean):` }), ...units);
  parts.push(el("div", { class: "bars", id: "units-bars" },
    barGroup(`attack success (${r.n_eval} triggered scenes)`, [["before", r.asr_before, "before"], ["ranked units", r.asr_after, "after"],
      [`random units`, r.random_asr_after, "random"]]),
    barGroup(`clean accuracy (${r.n_clean} scenes)`, [["before", r.clean_before, "before"], ["ranked units", r.clean_after, "after"],
      ["random units", r.random_clean_after, "random"]])));
  parts.push(el("p", { class: "hint", text: `attack success cut by ${pct(r.asr_relative_cut)} at a clean-accuracy cost of ` +
    `${(100 * r.clean_drop).toFixed(1)} points; random units: mean of ${r.n_random_draws} draws (${r.random_asr_draws.map(pct).join(", ")}).` }));
  if (r.curve && r.curve.length > 1) parts.push(curveChart(r.curve));
  const onStack = state.model && state.model.stack.some((e) => e.id === rec.state.id);
  const apply = el("button", { id: "btn-apply-units", text: onStack ? "On the stack" : "Apply this ablation to the model" });
  apply.disabled = onStack;
  apply.addEventListener("click", () => guarded(apply, async () => {
    const out = await api("POST", `/api/models/${state.model.key}/units/${rec.state.id}/apply`);
    toast(`applied: ${out.edit.summary}; undo it on the Model page`, "info");
    await refreshModel();
    renderUnits(rec);
  }));
  parts.push(el("div", { class: "row" }, apply, el("span", { class: "hint", text: "the delta goes on the stack of edits; undo reverts it bit-exactly" })));
  box.replaceChildren(...parts);
}

// --- studies -----------------------------------------------------------------------------

const FACETS = [["verdict", "verdict"], ["study", "study"], ["method", "method"], ["basis", "basis"], ["source", "source"]];

function when(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function counts(c) {
  return el("span", { class: "counts" }, ...["held", "failed", "inconclusive", "pending"].filter((v) => c[v])
    .map((v) => el("span", { class: `badge ${v}`, text: `${c[v]} ${v}` })));
}

async function loadStudies() {
  if (!state.studies) {
    const data = await api("GET", "/api/studies");
    state.studies = data.studies;
    const select = $("#study-select");
    select.replaceChildren(...data.studies.map((s) => el("option", { value: s.name,
      text: `${s.number ? s.number + ". " : ""}${s.title}${s.world ? " · " + s.world : ""}` })));
    const last = localStorage.getItem("wb.study");
    if (last && data.studies.some((s) => s.name === last)) select.value = last;
    if (data.busy && !state.studyFollowing) followStudy(data.busy.id);
  }
  await loadRuns();
}

async function loadRuns() {
  const { runs } = await api("GET", "/api/runs");
  $("#run-count").textContent = String(runs.length);
  if (!runs.length) { $("#runs").replaceChildren(el("p", { class: "hint", text: "no runs yet: start a study" })); return runs; }
  const rows = runs.map((r) => {
    const status = r.running ? el("span", { class: "badge running", text: "running" })
      : r.complete ? el("span", { class: "badge good", text: "complete" }) : el("span", { class: "badge pending", text: "incomplete" });
    const tr = el("tr", { class: "run" + (state.run && state.run.path === r.path ? " selected" : ""), "data-path": r.path },
      el("td", {}, el("code", { text: r.path })), el("td", { text: r.studies.map((s) => s.study).join(", ") }),
      el("td", { class: "num", text: when(r.started) }), el("td", { text: r.quick ? "quick" : "full" }),
      el("td", {}, status), el("td", {}, counts(r.counts)));
    tr.addEventListener("click", () => guarded(null, () => openRun(r.path)));
    return tr;
  });
  $("#runs").replaceChildren(el("table", { class: "list", id: "runs-table" },
    el("tr", {}, ...["folder", "studies", "started", "mode", "", "predictions"].map((h) => el("th", { text: h }))), ...rows));
  return runs;
}

const fileUrl = (path, name) => `/api/run/file?path=${encodeURIComponent(path)}&name=${encodeURIComponent(name)}`;

async function openRun(path) {
  const run = await api("GET", `/api/run?path=${encodeURIComponent(path)}`);
  state.run = run;
  state.filters = {};
  localStorage.setItem("wb.run", path);
  for (const tr of document.querySelectorAll("#runs-table tr.run")) tr.classList.toggle("selected", tr.dataset.path === path);
  $("#run-view").hidden = false;
  $("#run-title").textContent = path;
  $("#run-state").replaceChildren(run.running ? el("span", { class: "badge running", text: "running" })
    : el("span", { class: `badge ${run.complete ? "good" : "pending"}`, text: run.complete ? "complete" : "incomplete" }));
  const report = $("#run-report");
  report.hidden = !run.report;
  if (run.report) report.href = fileUrl(path, run.report);
  const r = run.run, suite = r.suite || {};
  const models = [...new Set(run.studies.flatMap((st) => st.models || []))];
  const cal = run.calibration;
  $("#run-meta").textContent = [`started ${when(r.started)}`,
    `suite ${suite.name || "?"}: ${models.length ? models.join(", ") : "no model (the studies load none)"}`,
    `device ${r.device || "?"}, ${r.threads || "?"} thread(s)`,
    cal ? `calibration: ${cal.counts.held} of ${cal.n_predictions} predictions held` : null].filter(Boolean).join(" · ");
  $("#run-studies").replaceChildren(...run.studies.map((st) => {
    const figs = st.figures.map((f) => {
      const a = el("a", { href: fileUrl(path, `${st.study}/${f.file}`), target: "_blank", rel: "noopener", title: f.caption });
      a.append(el("img", { src: fileUrl(path, `${st.study}/${f.file}`), alt: f.caption, loading: "lazy" }));
      return a;
    });
    return el("div", { class: "study-card", "data-study": st.study },
      el("h4", {}, st.number ? `${st.number}. ` : "", st.title || st.study, el("span", { class: `badge ${st.verdict}`, text: st.verdict })),
      el("p", { text: st.hypothesis || "" }),
      el("p", { class: "hint", text: `${st.cases ?? 0} cases · seeds ${(st.seeds || []).join(", ")} · ${st.quick ? "quick" : "full"}` +
        `${st.models.length ? " · " + st.models.join(", ") : ""}${st.timing.sum_case_s ? ` · ${st.timing.sum_case_s.toFixed(1)} s in cases` : ""}` }),
      counts(st.counts),
      st.prediction_sha256 ? el("p", { class: "hash" }, "prediction sha256 ", el("code", { text: st.prediction_sha256.slice(0, 24) + "…" })) : "",
      el("div", { class: "figs" }, ...figs));
  }));
  $("#pred-filters").replaceChildren(...FACETS.map(([key, label]) => {
    const sel = el("select", { id: `filter-${key}`, "data-facet": key });
    sel.append(el("option", { value: ALL, text: `all (${run.n_predictions})` }));
    for (const [value, n] of Object.entries(run.facets[key] || {}))
      sel.append(el("option", { value, text: `${value === "" ? "(none)" : value} (${n})` }));
    sel.addEventListener("change", () => { state.filters[key] = sel.value; renderPredictions(); });
    return el("label", {}, label, sel);
  }));
  renderPredictions();
  return run;
}

function interval(ci) {
  return ci && ci[0] !== null && ci[0] !== undefined ? `[${fmt(ci[0])}, ${fmt(ci[1])}]` : "";
}

function sizeText(size) {
  if (size === null || size === undefined) return "–";
  return Array.isArray(size) ? `[${fmt(size[0])}, ${fmt(size[1])}]` : fmt(size);
}

const ALL = "__all__";

function renderPredictions() {
  const run = state.run;
  const shown = run.predictions.filter((p) => Object.entries(state.filters)
    .every(([k, v]) => v === undefined || v === ALL || String(p[k] ?? "") === v));
  $("#pred-count").textContent = shown.length === run.n_predictions ? String(shown.length) : `${shown.length} of ${run.n_predictions}`;
  const arrow = { increase: "↑", decrease: "↓", none: "=" };
  const rows = shown.map((p) => el("tr", { "data-verdict": p.verdict },
    el("td", { text: p.study }),
    el("td", { class: "claim" }, el("b", { text: p.id }), el("br"), p.claim || "", p.primary ? "" : el("span", { class: "hint", text: " (secondary)" })),
    el("td", { text: p.method || "–" }),
    el("td", {}, p.basis || "–", p.source ? el("div", { class: "src", text: p.source }) : ""),
    el("td", { class: "num", title: p.rule || "" }, `${arrow[p.direction] || ""} ${sizeText(p.size)}`),
    el("td", { class: "num" }, fmt(p.measured), el("div", { class: "src", text: interval(p.ci) })),
    el("td", {}, el("span", { class: `badge ${p.verdict}`, text: p.verdict })),
    el("td", { class: "why", text: p.why || "" })));
  $("#pred-table").replaceChildren(el("tr", {}, ...["study", "prediction", "method", "basis · source", "predicted", "measured (95% CI)",
    "verdict", "why"].map((h) => el("th", { text: h }))), ...rows);
}

async function followStudy(jobId) {
  state.studyFollowing = jobId;
  localStorage.setItem("wb.studyJob", jobId);
  $("#btn-study").disabled = true;
  try {
    const rec = await follow(jobId, $("#study-job"));
    if (!rec) return;
    const out = rec.config && rec.config.out;
    const runs = await loadRuns();
    if (rec.state.status === "done") toast(rec.state.message, "info");
    else toast(`study ${rec.state.status}${rec.state.error ? ": " + rec.state.error : ""}`, rec.state.status === "cancelled" ? "info" : "error");
    if (out && runs.some((r) => r.path === out)) await openRun(out);
    $("#study-job").append(el("span", { id: "study-status", class: `badge ${rec.state.status === "done" ? "good" : "meh"}`, text: rec.state.status }));
  } finally {
    state.studyFollowing = null;
    $("#btn-study").disabled = false;
  }
}

async function startStudy() {
  const body = { study: $("#study-select").value, quick: $("#study-quick").checked };
  if ($("#study-seeds").value.trim()) body.seeds = Number($("#study-seeds").value);
  localStorage.setItem("wb.study", body.study);
  $("#btn-study").disabled = true;
  let started;
  try { started = await api("POST", "/api/studies", body); } finally { $("#btn-study").disabled = false; }
  await loadRuns();
  followStudy(started.job.id);
  return started;
}

// --- start -------------------------------------------------------------------------------

async function restore() {
  const saved = localStorage.getItem("wb.model");
  if (!saved) return;
  try { await openModel(JSON.parse(saved)); } catch (e) { localStorage.removeItem("wb.model"); return; }
  for (const [key, render] of [["wb.traceJob", (r) => r.result && renderTrace(r.result)],
    ["wb.editJob", (r) => { state.lastEdit = r; renderResult(r); }],
    ["wb.unitsJob", (r) => { guarded(null, loadUnits); renderUnits(r); }]]) {
    const id = localStorage.getItem(key);
    if (!id) continue;
    try {
      const rec = await api("GET", `/api/jobs/${id}`);
      if (rec.state.model === state.model.key) render(rec);
    } catch (e) { localStorage.removeItem(key); }
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showPage(tab.dataset.page));
  $("#open-model").addEventListener("click", (e) => guarded(e.target, () => openModel({ spec: $("#model-select").value })));
  $("#open-folder").addEventListener("click", (e) => guarded(e.target, () => openModel({ folder: $("#model-folder").value })));
  $("#btn-export").addEventListener("click", (e) => guarded(e.target, async () => {
    const r = await api("POST", `/api/models/${state.model.key}/export`, { folder: $("#export-folder").value });
    $("#export-result").textContent = `wrote ${r.files} files to ${r.folder}`;
  }));
  $("#btn-save").addEventListener("click", (e) => guarded(e.target, async () => {
    const r = await api("POST", `/api/models/${state.model.key}/save`, { folder: $("#save-folder").value });
    $("#export-result").textContent = `saved the model with ${r.edits} edit(s) to ${r.folder}; open it as a folder`;
    await loadChoices();
  }));
  $("#btn-example").addEventListener("click", (e) => guarded(e.target, fillExample));
  $("#btn-answers").addEventListener("click", (e) => guarded(e.target, showAnswers));
  $("#btn-trace").addEventListener("click", (e) => guarded(e.target, runTrace));
  $("#prediction-form").addEventListener("submit", submitPrediction);
  $("#btn-new-prediction").addEventListener("click", () => { setFrozen(false); $("#prediction-hash").replaceChildren(); });
  $("#btn-study").addEventListener("click", () => guarded(null, startStudy));
  $("#btn-units").addEventListener("click", (e) => guarded(e.target, runUnits));
  showPage(localStorage.getItem("wb.page") || "model");
  await guarded(null, loadChoices);
  await restore();
  if (localStorage.getItem("wb.page") === "studies") {
    const path = localStorage.getItem("wb.run");
    if (path) try { await openRun(path); } catch (e) { localStorage.removeItem("wb.run"); }
  }
  document.body.dataset.ready = "1";
});
