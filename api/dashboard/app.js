// The kiln dashboard: a single page with hash routes, talking to /v1 with the API key the user signed in with.
//   #/signin  #/jobs  #/jobs/<id>  #/new[?from=<job id>|?dataset=<dataset id>]  #/datasets  #/workers

import { api, ApiError, clearKey, getKey, isAbort, onUnauthorized, qs, readEvents, setKey } from "./api.js";
import { fmt, LineChart, sparkline } from "./chart.js";

const main = document.getElementById("main");
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const BUILTIN_DATASETS = ["digits", "iris", "wine", "breast_cancer", "diabetes", "moons", "blobs", "regression", "sine"];

// --- small DOM helpers ------------------------------------------------------------------------------------

/** h("div", {class, text, on: {click}, data: {x}, ...attributes}, ...children) */
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(status) {
  return h("span", { class: `badge ${status}`, data: { status }, text: status });
}

function progressBar(done, total, status) {
  const bar = h("div", { class: `progress ${status}`, role: "progressbar", "aria-valuemin": "0",
    "aria-valuemax": String(total), "aria-valuenow": String(done) });
  const fill = h("div", { class: "fill" });
  fill.style.width = `${total ? Math.min(100, (100 * done) / total) : 0}%`;
  bar.append(fill);
  return bar;
}

function copyButton(text, label = "copy") {
  return h("button", {
    type: "button", class: "chip small", title: "Copy to the clipboard", text: label,
    on: {
      click: async (e) => {
        try {
          await navigator.clipboard.writeText(text);
          e.target.textContent = "copied";
        } catch {
          e.target.textContent = "select and copy";
        }
        setTimeout(() => (e.target.textContent = label), 1200);
      },
    },
  });
}

function callout(kind, ...children) {
  return h("div", { class: `callout ${kind}`, role: kind === "error" ? "alert" : null }, ...children);
}

function errorCallout(err, what = "") {
  const message = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  return callout("error", what ? `${what}: ` : "", message);
}

let toastTimer = 0;
function toast(message, kind = "info") {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.className = `toast ${kind}`;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), 5000);
}

function setConnection(problem) {
  const el = document.getElementById("conn");
  el.hidden = !problem;
  el.textContent = problem || "";
}

const when = (iso) => (iso ? new Date(iso) : null);

function ago(iso) {
  const t = when(iso);
  if (!t) return "–";
  const s = Math.max(0, (Date.now() - t.getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return t.toLocaleDateString(undefined, { month: "short", day: "numeric", year: s > 300 * 86400 ? "numeric" : undefined });
}

function timeEl(iso) {
  const t = when(iso);
  return h("time", { datetime: iso || "", title: t ? t.toLocaleString() : "", text: ago(iso) });
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function jobDuration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? when(job.finished_at) : new Date();
  return (end - when(job.started_at)) / 1000;
}

const jobTitle = (job) => job.name || `job ${job.id.slice(0, 8)}`;

function uid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Evenly spaced values, first and last kept: the shape of a whole run in n points. */
function downsample(values, n) {
  if (values.length <= n) return values;
  const out = [];
  for (let i = 0; i < n; i++) out.push(values[Math.round((i * (values.length - 1)) / (n - 1))]);
  return out;
}

// --- pages and their lifetime -----------------------------------------------------------------------------

/** What a page owns: an AbortSignal for its requests and streams, loops that stop when it is left. */
class Page {
  constructor() {
    this.ctrl = new AbortController();
    this.signal = this.ctrl.signal;
    this.cleanups = [];
  }

  get alive() {
    return !this.signal.aborted;
  }

  sleep(ms) {
    return new Promise((resolve, reject) => {
      if (!this.alive) return reject(new DOMException("left the page", "AbortError"));
      const t = setTimeout(resolve, ms);
      this.signal.addEventListener("abort", () => {
        clearTimeout(t);
        reject(new DOMException("left the page", "AbortError"));
      }, { once: true });
    });
  }

  /** Runs fn now and then every ms while the page is shown (paused while the tab is hidden). */
  every(ms, fn) {
    const loop = async () => {
      while (this.alive) {
        if (!document.hidden) {
          try {
            await fn();
            setConnection("");
          } catch (err) {
            if (isAbort(err) || !this.alive) return;
            if (err instanceof ApiError && err.status === 401) return;
            setConnection(err instanceof ApiError && err.status === 0 ? "server unreachable; retrying…" : err.message);
          }
        }
        try {
          await this.sleep(ms);
        } catch {
          return;
        }
      }
    };
    loop();
  }

  onLeave(fn) {
    this.cleanups.push(fn);
  }

  leave() {
    this.ctrl.abort();
    for (const fn of this.cleanups) fn();
  }
}

let current = null;
let flash = { text: "", kind: "error" };

const ROUTES = [
  [/^#\/signin$/, signinPage, "signin"],
  [/^#\/jobs\/([^/?]+)$/, jobPage, "jobs"],
  [/^#\/jobs$/, jobsPage, "jobs"],
  [/^#\/new$/, newJobPage, "new"],
  [/^#\/datasets$/, datasetsPage, "datasets"],
  [/^#\/workers$/, workersPage, "workers"],
];

function route() {
  const hash = location.hash || "#/jobs";
  const [path, query = ""] = hash.split("?");
  // The sign-in sentence lasts until the user leaves the sign-in page: two 401s racing each other re-render it.
  if (path !== "#/signin") flash = { text: "", kind: "error" };
  if (!getKey() && path !== "#/signin") {
    sessionStorage.setItem("kiln.next", hash);
    location.replace("#/signin");
    return;
  }
  if (current) current.leave();
  const page = (current = new Page());
  setConnection("");
  document.getElementById("signout").hidden = !getKey();
  const found = ROUTES.find(([re]) => re.test(path));
  if (!found) {
    location.replace("#/jobs");
    return;
  }
  const [re, render, nav] = found;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.nav === nav);
  const view = h("div", { class: "view", data: { view: nav } });
  main.replaceChildren(view);
  const args = path.match(re).slice(1).map((part) => {
    try {
      return decodeURIComponent(part);
    } catch {
      return part; // a malformed %-escape: use it as typed (the server will say there is no such job)
    }
  });
  Promise.resolve(render(page, view, new URLSearchParams(query), ...args)).catch((err) => {
    if (isAbort(err) || !page.alive) return;
    if (err instanceof ApiError && err.status === 401) return;
    view.append(errorCallout(err));
  });
}

onUnauthorized((message) => {
  clearKey();
  flash = { text: message, kind: "error" };
  if (!location.hash.startsWith("#/signin")) sessionStorage.setItem("kiln.next", location.hash || "#/jobs");
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin";
});

// --- theme ----------------------------------------------------------------------------------------------

const THEMES = ["auto", "light", "dark"];
function applyTheme(theme) {
  const root = document.documentElement;
  if (theme === "auto") delete root.dataset.theme;
  else root.dataset.theme = theme;
  const button = document.getElementById("theme-toggle");
  button.textContent = theme[0].toUpperCase() + theme.slice(1);
  button.title = theme === "auto" ? "Theme: follow the system" : `Theme: ${theme}`;
}

// --- sign in --------------------------------------------------------------------------------------------

function signinPage(page, view) {
  const { text: message, kind } = flash;
  const error = h("p", { id: "signin-error", class: kind === "error" ? "form-error" : "muted", role: "alert", text: message,
    hidden: !message });
  const input = h("input", { id: "signin-key", type: "password", name: "key", autocomplete: "off", spellcheck: "false",
    placeholder: "kiln_…", required: true, "aria-label": "API key" });
  const remember = h("input", { id: "signin-remember", type: "checkbox" });
  const submit = h("button", { id: "signin-submit", type: "submit", class: "primary", text: "Sign in" });
  const form = h("form", { id: "signin-form", class: "card narrow", autocomplete: "off" },
    h("h1", { text: "Sign in" }),
    h("p", { class: "muted" }, "Paste an API key: the one ", h("code", { text: "kiln up" }),
      " printed (also in ", h("code", { text: "~/.kiln/api_key" }), "), or one from ",
      h("code", { text: "kiln keys create" }), "."),
    h("label", { class: "field" }, h("span", { text: "API key" }), input),
    h("label", { class: "check" }, remember, h("span", { text: "Remember on this device (otherwise until the tab closes)" })),
    error,
    h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    submit.disabled = true;
    error.hidden = true;
    try {
      await api("/v1/jobs?limit=1", { key, quiet401: true, signal: page.signal });
      setKey(key, remember.checked);
      const next = sessionStorage.getItem("kiln.next");
      sessionStorage.removeItem("kiln.next");
      location.hash = next && !next.startsWith("#/signin") ? next : "#/jobs";
    } catch (err) {
      if (isAbort(err)) return;
      error.textContent = err.message;
      error.className = "form-error";
      error.hidden = false;
      submit.disabled = false;
      input.select();
    }
  });
  view.append(form);
  input.focus();
}

// --- jobs list ------------------------------------------------------------------------------------------

const sparkCache = new Map(); // job id -> {epochs, values, full (rows the server sent), at}
let serverDownsamples = false; // whether GET /metrics honours max_points

async function jobsPage(page, view) {
  const state = {
    status: sessionStorage.getItem("kiln.jobs.status") || "",
    name: sessionStorage.getItem("kiln.jobs.name") || "",
    loaded: 0,
    cursor: null,
    rows: new Map(),
  };
  const chips = h("div", { class: "chips", role: "group", "aria-label": "Filter by status" });
  const renderChips = () => {
    chips.replaceChildren(...["", ...STATUSES].map((s) => h("button", {
      type: "button", class: "chip", text: s || "all", "aria-pressed": String(state.status === s), data: { status: s },
      on: { click: () => { state.status = s; sessionStorage.setItem("kiln.jobs.status", s); renderChips(); reload(); } },
    })));
  };
  renderChips();
  let nameTimer = 0;
  const search = h("input", { type: "search", id: "jobs-search", placeholder: "name (exact)", value: state.name, "aria-label": "Filter by name (exact match)",
    on: { input: (e) => {
      clearTimeout(nameTimer);
      nameTimer = setTimeout(() => { state.name = e.target.value.trim(); sessionStorage.setItem("kiln.jobs.name", state.name); reload(); }, 300);
    } } });
  const tbody = h("tbody");
  const table = h("table", { id: "jobs-table", class: "table" },
    h("thead", {}, h("tr", {}, ["Status", "Name", "Data · model", "Progress", "Train loss", "Validation", "Created", "Duration"]
      .map((t) => h("th", { text: t })))), tbody);
  const empty = h("div", { class: "empty-state", hidden: true });
  const more = h("button", { type: "button", id: "jobs-more", class: "ghost", text: "Load more", hidden: true,
    on: { click: () => loadMore() } });
  view.append(
    h("div", { class: "page-head" }, h("h1", { text: "Jobs" }), h("a", { class: "button primary", href: "#/new", text: "New job" })),
    h("div", { class: "toolbar" }, chips, search),
    h("div", { class: "table-wrap" }, table), empty, more);

  const params = (limit, cursor) => qs({ status: state.status || null, name: state.name || null, limit, cursor });

  function render(items) {
    const seen = new Set();
    let previous = null;
    for (const job of items) {
      seen.add(job.id);
      let row = state.rows.get(job.id);
      const version = JSON.stringify([job.status, job.epochs_completed, job.cancel_requested, job.finished_at,
        job.latest_metrics && job.latest_metrics.epoch, Math.floor(Date.now() / 10000)]);
      if (!row) {
        row = { tr: h("tr", { data: { jobId: job.id } }), version: "" };
        state.rows.set(job.id, row);
      }
      if (row.version !== version) {
        row.version = version;
        fillRow(row.tr, job);
      }
      const place = previous ? previous.nextSibling : tbody.firstChild;
      if (place !== row.tr) tbody.insertBefore(row.tr, place);
      previous = row.tr;
      wantSpark(job);
    }
    for (const [id, row] of state.rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        state.rows.delete(id);
      }
    }
    empty.hidden = items.length > 0;
    table.hidden = items.length === 0;
    empty.replaceChildren(...(state.status || state.name
      ? ["No jobs match these filters."]
      : ["No jobs yet. ", h("a", { href: "#/new", text: "Submit one" }), " or run ", h("code", { text: "kiln submit examples/digits.json" }), "."]));
    more.hidden = !state.cursor;
  }

  function fillRow(tr, job) {
    const spec = job.spec || {};
    const model = spec.model || {};
    const total = spec.epochs || 0;
    const m = job.latest_metrics;
    const sparkCell = h("td", { class: "spark-cell" });
    const cached = sparkCache.get(job.id);
    if (cached) sparkCell.append(sparkline(cached.values, { label: "train loss" }));
    if (m) sparkCell.append(h("span", { class: "num", text: fmt(m.train_loss) }));
    const val = m
      ? [m.val_loss !== null ? h("span", { class: "num", title: "validation loss", text: fmt(m.val_loss) }) : null,
         m.val_accuracy !== null ? h("span", { class: "num muted", title: "validation accuracy", text: ` ${(100 * m.val_accuracy).toFixed(1)}%` }) : null,
         m.val_r2 !== null && m.val_r2 !== undefined ? h("span", { class: "num muted", title: "validation R²", text: ` R² ${fmt(m.val_r2, 3)}` }) : null]
      : "–";
    const note = job.status === "failed" ? job.error : job.stop_reason || (job.cancel_requested && !TERMINAL.has(job.status) ? "cancel requested" : "");
    tr.replaceChildren(
      h("td", {}, badge(job.status)),
      h("td", { class: "name" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: jobTitle(job) }),
        h("div", { class: "sub mono", text: job.id.slice(0, 8) }),
        note ? h("div", { class: `sub ${job.status === "failed" ? "bad" : ""}`, text: note, title: note }) : null),
      h("td", {}, h("span", { text: (spec.data && spec.data.dataset) || "?" }),
        h("div", { class: "sub", text: [model.type, spec.optimizer && spec.optimizer.type].filter(Boolean).join(" · ") })),
      h("td", { class: "progress-cell" }, progressBar(job.epochs_completed, total, job.status),
        h("div", { class: "sub num", text: `${job.epochs_completed}/${total}` })),
      sparkCell,
      h("td", {}, val),
      h("td", {}, timeEl(job.created_at)),
      h("td", { class: "num" }, duration(jobDuration(job))),
    );
  }

  // Sparklines: fetched when a job's epoch count changed, a few at a time, cached across visits.
  const wanted = new Map();
  let fetching = 0;
  function wantSpark(job) {
    if (!job.epochs_completed) return;
    const cached = sparkCache.get(job.id);
    if (cached && cached.epochs === job.epochs_completed) return;
    // A server that ignores max_points sends every epoch: refresh a long run's sparkline less often then.
    if (cached && !serverDownsamples && cached.full > 400 && Date.now() - cached.at < 30_000) return;
    wanted.set(job.id, job.epochs_completed);
    pump();
  }
  function pump() {
    while (fetching < 3 && wanted.size && page.alive) {
      const [id, epochs] = wanted.entries().next().value;
      wanted.delete(id);
      fetching += 1;
      api(`/v1/jobs/${encodeURIComponent(id)}/metrics${qs({ max_points: 40 })}`, { signal: page.signal })
        .then((body) => {
          if (epochs > 40 && body.epochs.length <= 40) serverDownsamples = true;
          const values = downsample(body.epochs.map((e) => [e.epoch, e.train_loss]), 40);
          sparkCache.set(id, { epochs, values, full: body.epochs.length, at: Date.now() });
          const row = state.rows.get(id);
          const cell = row && row.tr.querySelector(".spark-cell");
          if (cell) {
            const old = cell.querySelector("svg.spark");
            const line = sparkline(values, { label: `train loss, ${body.epochs.length} epochs` });
            if (old) old.replaceWith(line);
            else cell.prepend(line);
          }
        })
        .catch(() => {}) // a sparkline is decoration: the next refresh asks again
        .finally(() => {
          fetching -= 1;
          pump();
        });
    }
  }

  let generation = 0;
  async function refresh() {
    const mine = generation;
    const limit = Math.min(200, Math.max(50, state.loaded));
    const body = await api(`/v1/jobs${params(limit, null)}`, { signal: page.signal });
    if (mine !== generation) return;
    state.loaded = body.items.length;
    state.cursor = body.next_cursor;
    state.items = body.items;
    render(body.items);
  }
  async function loadMore() {
    more.disabled = true;
    try {
      const body = await api(`/v1/jobs${params(50, state.cursor)}`, { signal: page.signal });
      state.items = [...state.items, ...body.items.filter((j) => !state.rows.has(j.id))];
      state.loaded = state.items.length;
      state.cursor = body.next_cursor;
      render(state.items);
    } catch (err) {
      if (!isAbort(err)) toast(err.message, "error");
    } finally {
      more.disabled = false;
    }
  }
  function reload() {
    generation += 1;
    state.loaded = 0;
    refresh().catch((err) => { if (!isAbort(err)) toast(err.message, "error"); });
  }
  page.every(3000, refresh);
}

// --- one job --------------------------------------------------------------------------------------------

const CHARTS = [
  { metric: "loss", title: "Loss", series: [["train_loss", "train", 0], ["val_loss", "val", 1]] },
  { metric: "accuracy", title: "Accuracy", allowLog: false, series: [["train_accuracy", "train", 0], ["val_accuracy", "val", 1]] },
  { metric: "r2", title: "Validation R²", allowLog: false, series: [["val_r2", "val", 1]] },
  { metric: "lr", title: "Learning rate", series: [["lr", "lr", 2]] },
  { metric: "grad_norm", title: "Gradient norm (before clipping)", series: [["grad_norm", "total", 3]] },
  { metric: "throughput", title: "Throughput (samples/s)", allowLog: false, series: [["samples_per_s", "samples/s", 4]] },
];

const MAX_LOADED_EPOCHS = 5000;

async function jobPage(page, view, _query, jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const state = { job: null, metrics: new Map(), historyKey: "", charts: new Map(), frame: 0, showAll: false };

  let job;
  try {
    job = await api(path, { signal: page.signal });
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      view.append(h("div", { class: "crumbs" }, h("a", { href: "#/jobs", text: "Jobs" })),
        callout("error", `No job ${jobId}: it does not exist, or another key owns it.`));
      return;
    }
    throw err;
  }
  state.job = job;

  // layout
  const title = h("h1", { id: "job-title" });
  const status = h("span", { id: "job-status" });
  const live = h("span", { id: "live-mode", class: "live", data: { mode: "off" } });
  const actions = h("div", { class: "actions", id: "job-actions" });
  const notes = h("div", { id: "job-notes" });
  const stats = h("div", { class: "stats", id: "job-stats" });
  const smoothing = Number(localStorage.getItem("kiln.smoothing") || 0);
  const smoothValue = h("output", { text: smoothing.toFixed(2) });
  const smoother = h("input", { type: "range", id: "smoothing", min: "0", max: "0.99", step: "0.01", value: String(smoothing),
    "aria-label": "Smoothing",
    on: { input: (e) => {
      const w = Number(e.target.value);
      smoothValue.textContent = w.toFixed(2);
      localStorage.setItem("kiln.smoothing", String(w));
      for (const chart of state.charts.values()) chart.setSmoothing(w);
    } } });
  const chartGrid = h("div", { class: "charts", id: "charts" });
  const slots = new Map(CHARTS.map((c) => [c.metric, h("div", { hidden: true })]));
  chartGrid.append(...slots.values());
  const lrSlot = h("div", { hidden: true });
  const layers = h("div", { class: "card", id: "layers", hidden: true });
  const epochsTable = h("div", { class: "card", id: "epochs" });
  const history = h("ol", { class: "timeline", id: "job-history" });
  const specPre = h("pre", { id: "job-spec", class: "code" });

  view.append(
    h("div", { class: "crumbs" }, h("a", { href: "#/jobs", text: "Jobs" }), " / ", h("span", { class: "mono", text: jobId.slice(0, 8) })),
    h("div", { class: "page-head" }, h("div", { class: "title-line" }, title, status, live), actions),
    h("div", { class: "sub mono idline" }, jobId, " ", copyButton(jobId, "copy id")),
    notes, stats,
    h("div", { class: "section-head" }, h("h2", { text: "Curves" }),
      h("label", { class: "smoother" }, h("span", { text: "Smoothing" }), smoother, smoothValue)),
    chartGrid, lrSlot, layers, epochsTable,
    h("div", { class: "two" },
      h("section", { class: "card" }, h("h2", { text: "History" }), history),
      h("section", { class: "card" }, h("div", { class: "section-head" }, h("h2", { text: "Spec" }), copyButton("", "copy")), specPre)),
  );

  function setLive(mode) {
    live.dataset.mode = mode;
    live.textContent = { sse: "live", poll: "live · polling", reconnecting: "reconnecting…", off: "" }[mode];
    live.title = { sse: "Streaming events from the server", poll: "This server has no event stream; asking every second",
      reconnecting: "The stream dropped; reconnecting", off: "" }[mode];
  }

  function renderHeader() {
    const j = state.job;
    title.textContent = jobTitle(j);
    document.title = `${jobTitle(j)} · ${j.status} · kiln`;
    status.replaceChildren(badge(j.status));
    status.dataset.status = j.status;

    // Rebuilt only when what they offer changes, so a half-done "cancel?" confirmation survives live updates.
    const actionsKey = `${j.status}/${j.cancel_requested}`;
    if (actionsKey === state.actionsKey) return renderNotes();
    state.actionsKey = actionsKey;
    actions.replaceChildren();
    if (!TERMINAL.has(j.status)) {
      if (j.cancel_requested) actions.append(h("button", { type: "button", disabled: true, text: "Cancelling…" }));
      else actions.append(cancelButton());
    }
    if (j.status === "succeeded") {
      actions.append(downloadButton("model"));
      if (j.spec && j.spec.model && j.spec.model.type === "autoencoder") actions.append(downloadButton("encoder"));
    }
    actions.append(h("a", { class: "button ghost", href: `#/new?from=${encodeURIComponent(j.id)}`, text: "Clone",
      title: "A new job from this spec" }));
    renderNotes();
  }

  function renderNotes() {
    const j = state.job;
    notes.replaceChildren();
    if (j.status === "failed" && j.error) notes.append(callout("error", h("strong", { text: "Failed: " }), h("span", { id: "job-error", text: j.error })));
    if (j.stop_reason) notes.append(callout("info", h("strong", { text: "Stopped early: " }), h("span", { id: "stop-reason", text: j.stop_reason })));
    if (j.cancel_requested && !TERMINAL.has(j.status)) notes.append(callout("warn", "Cancel requested; the job stops at the next batch."));
    if (j.status === "queued" && j.waiting_reason) notes.append(callout("warn", h("strong", { text: "Waiting: " }), h("span", { id: "waiting-reason", text: j.waiting_reason })));
    else if (j.status === "queued") notes.append(callout("info", "Queued: waiting for a free worker."));

    const text = JSON.stringify(j.spec, null, 2);
    if (specPre.textContent !== text) {
      specPre.textContent = text;
      specPre.parentElement.querySelector("button").replaceWith(copyButton(text, "copy"));
    }
    if (j.lr_search) renderLrSearch(j.lr_search);
  }

  function cancelButton() {
    const button = h("button", { type: "button", id: "cancel-btn", class: "danger", text: "Cancel job" });
    button.addEventListener("click", () => {
      const confirm = h("button", { type: "button", id: "cancel-confirm", class: "danger", text: "Yes, cancel it" });
      const keep = h("button", { type: "button", id: "cancel-keep", class: "ghost", text: "Keep running" });
      const box = h("span", { class: "confirm" }, h("span", { class: "muted", text: "Cancel this job?" }), confirm, keep);
      keep.addEventListener("click", () => box.replaceWith(cancelButton()));
      confirm.addEventListener("click", async () => {
        confirm.disabled = keep.disabled = true;
        try {
          applyJob(await api(`${path}/cancel`, { method: "POST", signal: page.signal }));
          toast(state.job.status === "cancelled" ? "Cancelled." : "Cancel requested; it stops at the next batch.");
        } catch (err) {
          if (isAbort(err)) return;
          toast(err.message, "error");
          applyJob(await api(path, { signal: page.signal }));
        }
      });
      button.replaceWith(box);
      confirm.focus();
    });
    return button;
  }

  function downloadButton(part) {
    const label = part === "encoder" ? "Download encoder" : "Download weights";
    const button = h("button", { type: "button", id: part === "encoder" ? "download-encoder" : "download-btn", class: "primary", text: label });
    button.addEventListener("click", async () => {
      button.disabled = true;
      button.textContent = "Downloading…";
      try {
        const response = await api(`${path}/weights${part === "encoder" ? "?part=encoder" : ""}`,
          { raw: true, headers: { Accept: "application/octet-stream" }, signal: page.signal });
        const blob = await response.blob();
        const name = filenameOf(response.headers.get("Content-Disposition")) || `${jobTitle(state.job)}.safetensors`;
        let check = "";
        const etag = (response.headers.get("ETag") || "").replaceAll('"', "");
        if (etag && crypto.subtle) {
          const sum = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer())),
            (b) => b.toString(16).padStart(2, "0")).join("");
          check = sum === etag ? `, sha256 ${sum.slice(0, 12)}… verified` : " — checksum MISMATCH, do not trust this file";
        }
        const url = URL.createObjectURL(blob);
        const a = h("a", { href: url, download: name, hidden: true });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60_000);
        toast(`Saved ${name} (${(blob.size / 1024).toFixed(1)} KiB${check})`, check.includes("MISMATCH") ? "error" : "info");
      } catch (err) {
        if (!isAbort(err)) toast(err.message, "error");
      } finally {
        button.disabled = false;
        button.textContent = label;
      }
    });
    return button;
  }

  function renderStats() {
    const j = state.job;
    const rows = sortedMetrics();
    const last = rows[rows.length - 1] || j.latest_metrics;
    const total = (j.spec && j.spec.epochs) || 0;
    let best = null;
    for (const r of rows) if (r.val_loss !== null && (best === null || r.val_loss < best.val_loss)) best = r;
    const stat = (label, value, sub = null, id = null) =>
      h("div", { class: "stat", id }, h("div", { class: "label", text: label }), h("div", { class: "value" }, value), sub ? h("div", { class: "sub" }, sub) : null);
    stats.replaceChildren(...[
      stat("Progress", h("span", { class: "num", id: "job-progress", text: `${j.epochs_completed} / ${total} epochs` }),
        progressBar(j.epochs_completed, total, j.status)),
      stat("Train loss", fmt(last ? last.train_loss : null)),
      stat("Val loss", fmt(last ? last.val_loss : null), best ? `best ${fmt(best.val_loss)} @ epoch ${best.epoch}` : null),
      last && last.val_accuracy !== null && last.val_accuracy !== undefined
        ? stat("Val accuracy", `${(100 * last.val_accuracy).toFixed(2)}%`,
          (() => { let b = null; for (const r of rows) if (r.val_accuracy !== null && (!b || r.val_accuracy > b.val_accuracy)) b = r; return b ? `best ${(100 * b.val_accuracy).toFixed(2)}% @ ${b.epoch}` : null; })())
        : null,
      last && last.val_r2 !== null && last.val_r2 !== undefined ? stat("Val R²", fmt(last.val_r2)) : null,
      stat("Throughput", last ? `${fmt(Math.round(last.samples_per_s))} /s` : "–", last ? `${duration(last.duration_s)} per epoch` : null),
      stat("Duration", duration(jobDuration(j)), j.started_at ? h("span", {}, "started ", timeEl(j.started_at)) : h("span", {}, "created ", timeEl(j.created_at))),
      stat("Worker", j.worker || "–", `attempt ${j.attempt}${j.checkpoint_epoch ? ` · checkpoint @ ${j.checkpoint_epoch}` : ""}`),
    ].filter(Boolean));
  }

  function sortedMetrics() {
    return [...state.metrics.values()].sort((a, b) => a.epoch - b.epoch);
  }

  function renderCharts() {
    const rows = sortedMetrics();
    for (const def of CHARTS) {
      const series = def.series.map(([key, label, color]) => ({
        key, label, color,
        points: rows.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.epoch, r[key]]),
      }));
      const present = series.filter((s) => s.points.length);
      const slot = slots.get(def.metric);
      let chart = state.charts.get(def.metric);
      if (!present.length && !(def.metric === "loss")) continue; // the loss chart shows even while waiting
      if (!chart) {
        slot.hidden = false;
        chart = new LineChart(slot, { title: def.title, metric: def.metric, allowLog: def.allowLog !== false });
        chart.setSmoothing(Number(smoother.value));
        state.charts.set(def.metric, chart);
        page.onLeave(() => chart.destroy());
      }
      chart.setSeries(def.metric === "loss" ? series : present);
    }
    renderLayers(rows[rows.length - 1]);
    renderEpochs(rows);
  }

  function renderLrSearch(search) {
    if (state.charts.has("lr_search") || !search || !Array.isArray(search.sweep) || !search.sweep.length) return;
    lrSlot.hidden = false;
    const chart = new LineChart(lrSlot, { title: `Learning-rate range test (chose ${fmt(search.lr)})`, metric: "lr_search", xLabel: "lr", xLog: true });
    chart.setSeries([{ key: "sweep", label: "loss", color: 0, points: search.sweep.map(([lr, loss]) => [lr, loss]) }]);
    state.charts.set("lr_search", chart);
    page.onLeave(() => chart.destroy());
  }

  function renderLayers(last) {
    const per = last && last.grad_norm_per_layer;
    if (!per || !Object.keys(per).length) return;
    layers.hidden = false;
    const max = Math.max(...Object.values(per).filter(Number.isFinite), 1e-12);
    layers.replaceChildren(h("h2", { text: `Gradient norm per layer (epoch ${last.epoch})` }),
      h("div", { class: "bars" }, Object.entries(per).map(([name, v]) => {
        const fill = h("div", { class: "fill" });
        fill.style.width = `${Number.isFinite(v) ? (100 * v) / max : 0}%`;
        return h("div", { class: "bar-row" }, h("span", { class: "mono", text: name }), h("div", { class: "bar" }, fill), h("span", { class: "num", text: fmt(v) }));
      })));
  }

  function renderEpochs(rows) {
    const cols = [["epoch", "epoch"], ["train_loss", "train loss"], ["val_loss", "val loss"], ["train_accuracy", "train acc"],
      ["val_accuracy", "val acc"], ["val_r2", "val R²"], ["lr", "lr"], ["grad_norm", "grad norm"], ["duration_s", "time"], ["attempt", "attempt"]]
      .filter(([k]) => k === "epoch" || rows.some((r) => r[k] !== null && r[k] !== undefined));
    const shown = state.showAll ? rows.slice().reverse() : rows.slice(-10).reverse();
    const toggle = rows.length > 10
      ? h("button", { type: "button", class: "chip small", text: state.showAll ? "last 10" : `all ${rows.length}`,
        on: { click: () => { state.showAll = !state.showAll; renderEpochs(sortedMetrics()); } } })
      : null;
    epochsTable.replaceChildren(
      h("div", { class: "section-head" }, h("h2", { text: "Epochs" }),
        state.thinned ? h("span", { class: "sub", text: `a long run: ${rows.length} of ${state.job.epochs_completed} epochs loaded, each stretch's extremes kept` }) : null,
        toggle),
      rows.length
        ? h("div", { class: "table-wrap" }, h("table", { class: "table compact" },
          h("thead", {}, h("tr", {}, cols.map(([, t]) => h("th", { text: t })))),
          h("tbody", {}, shown.map((r) => h("tr", {}, cols.map(([k]) => h("td", { class: "num",
            text: k === "duration_s" ? duration(r[k]) : k.includes("accuracy") && r[k] !== null ? `${(100 * r[k]).toFixed(2)}%` : fmt(r[k]) })))))))
        : h("p", { class: "muted", text: "No epoch has finished yet." }));
  }

  async function loadHistory() {
    const body = await api(`${path}/history`, { signal: page.signal });
    history.replaceChildren(...body.events.map((e) => h("li", { class: `event ${e.kind}` },
      h("div", { class: "when" }, timeEl(e.at)),
      h("div", {}, h("span", { class: `kind ${e.kind}`, text: e.kind.replaceAll("_", " ") }),
        h("span", { text: " " + e.message })))));
  }

  function scheduleRender() {
    if (state.frame) return;
    state.frame = requestAnimationFrame(() => {
      state.frame = 0;
      renderStats();
      renderCharts();
    });
  }
  page.onLeave(() => state.frame && cancelAnimationFrame(state.frame));

  function applyJob(next) {
    const before = state.job;
    state.job = next;
    renderHeader();
    scheduleRender();
    const key = `${next.status}/${next.attempt}/${next.cancel_requested}`;
    if (key !== state.historyKey) {
      state.historyKey = key;
      loadHistory().catch(() => {});
    }
    return before;
  }

  function applyMetrics(rows) {
    for (const r of rows) state.metrics.set(r.epoch, r);
    if (rows.length) scheduleRender();
  }

  const maxEpoch = () => Math.max(0, ...state.metrics.keys());

  // first paint
  // A very long run arrives thinned by the server (each stretch's extremes kept); live epochs come in full.
  const first = await api(`${path}/metrics${qs({ max_points: MAX_LOADED_EPOCHS })}`, { signal: page.signal });
  state.thinned = first.epochs.length < job.epochs_completed;
  applyMetrics(first.epochs);
  applyJob(job);
  renderStats();
  renderCharts();

  // keep the duration and "x s ago" fresh while nothing else happens
  page.every(5000, async () => scheduleRender());

  async function finish() {
    setLive("off");
    const j = await api(path, { signal: page.signal });
    if (maxEpoch() < j.epochs_completed) {
      applyMetrics((await api(`${path}/metrics${qs({ since: maxEpoch() })}`, { signal: page.signal })).epochs);
    }
    state.historyKey = "";
    applyJob(j);
  }

  async function poll() {
    setLive("poll");
    while (page.alive) {
      try {
        const [j, m] = await Promise.all([
          api(path, { signal: page.signal }),
          api(`${path}/metrics${qs({ since: maxEpoch() })}`, { signal: page.signal }),
        ]);
        applyMetrics(m.epochs);
        applyJob(j);
        setConnection("");
        if (TERMINAL.has(j.status)) return finish();
      } catch (err) {
        if (isAbort(err) || !page.alive) return;
        if (err instanceof ApiError && err.status === 401) return;
        setConnection(err.status === 0 ? "server unreachable; retrying…" : err.message);
      }
      await page.sleep(1000);
    }
  }

  async function stream() {
    // kiln's event ids count the epochs sent: resuming after the ones already loaded skips a replay.
    let lastId = maxEpoch() > 0 ? String(maxEpoch()) : null;
    let failures = 0;
    while (page.alive && !TERMINAL.has(state.job.status)) {
      let ended = false;
      let connected = false;
      try {
        setLive(failures ? "reconnecting" : "sse");
        const result = await readEvents(`${path}/events`, {
          lastEventId: lastId,
          signal: page.signal,
          onEvent: (event) => {
            let data;
            try {
              data = event.data ? JSON.parse(event.data) : null;
            } catch {
              return; // not JSON: nothing this page can use
            }
            setLive("sse");
            failures = 0;
            if (!connected) {
              // Epochs that landed between the first load and this connection, whatever the stream replays.
              connected = true;
              api(`${path}/metrics${qs({ since: maxEpoch() })}`, { signal: page.signal })
                .then((m) => applyMetrics(m.epochs))
                .catch(() => {});
            }
            if (event.type === "status" && data && data.id) applyJob(data);
            else if (event.type === "epoch" && data && Number.isInteger(data.epoch)) applyMetrics([data]);
            else if (event.type === "end") {
              ended = true;
              if (data && data.id) applyJob(data); // the final Job
            }
          },
        });
        lastId = result.lastEventId;
        if (ended) break;
        await page.sleep(result.retry ?? 1000);
      } catch (err) {
        if (isAbort(err) || !page.alive) return;
        if (err instanceof ApiError && err.status === 401) return;
        // No stream here (404/405: an older server), or one this page cannot use: ask every second instead.
        const refused = err instanceof ApiError && ((err.status >= 400 && err.status < 500 && ![408, 429].includes(err.status))
          || err.status === 501);
        if (refused) return poll();
        failures += 1;
        if (failures > 5) return poll(); // a stream that keeps dropping (a proxy that buffers or cuts it)
        setLive("reconnecting");
        try {
          await page.sleep(Math.min(10_000, 500 * 2 ** failures));
        } catch {
          return;
        }
      }
    }
    if (page.alive) return finish();
  }

  if (!TERMINAL.has(job.status)) stream().catch((err) => {
    if (!isAbort(err) && page.alive) toast(err.message, "error");
  });
}

function filenameOf(disposition) {
  if (!disposition) return "";
  const star = /filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)/.exec(disposition);
  if (star) {
    try {
      return decodeURIComponent(star[1].trim());
    } catch {
      // fall through to the plain form
    }
  }
  const plain = /filename\s*=\s*"?([^";]+)"?/.exec(disposition);
  return plain ? plain[1].trim() : "";
}

// --- new job --------------------------------------------------------------------------------------------

let presetsPromise = null;
function presets() {
  presetsPromise ||= fetch("/dashboard/presets.json", { credentials: "omit" }).then((r) => (r.ok ? r.json() : []))
    .catch(() => []);
  return presetsPromise;
}

async function newJobPage(page, view, query) {
  const draftKey = "kiln.draft";
  const textarea = h("textarea", { id: "spec-input", class: "code", rows: "20", spellcheck: "false", autocapitalize: "off",
    "aria-label": "Job spec (JSON)" });
  const errors = h("div", { id: "spec-errors", role: "alert" });
  const submit = h("button", { type: "submit", id: "spec-submit", class: "primary", text: "Submit job" });
  const format = h("button", { type: "button", class: "ghost", text: "Format JSON" });
  const presetBar = h("div", { class: "chips", id: "presets" });
  let idempotencyKey = uid();
  textarea.addEventListener("input", () => sessionStorage.setItem(draftKey, textarea.value));

  const form = h("form", { id: "new-job-form", class: "card" },
    h("div", { class: "section-head" }, h("h2", { text: "Spec" }), presetBar),
    h("p", { class: "muted" }, "A JSON JobSpec: ", h("code", { text: "data.dataset" }), " is required, everything else has a default. Options: ",
      h("code", { text: "model" }), " (mlp, cnn, rnn, autoencoder), ", h("code", { text: "loss" }), ", ",
      h("code", { text: "optimizer" }), ", ", h("code", { text: "scheduler" }), ", ", h("code", { text: "early_stopping" }), ", ",
      h("code", { text: "grad_clip" }), ", ", h("code", { text: "epochs" }), ", ", h("code", { text: "batch_size" }), ", ",
      h("code", { text: "seed" }), ". Schema: ", h("a", { href: "/docs#/jobs/createJob", target: "_blank", rel: "noopener", text: "API docs" }), "."),
    textarea, errors,
    h("div", { class: "actions" }, submit, format));
  view.append(h("div", { class: "page-head" }, h("h1", { text: "New job" })), form);

  format.addEventListener("click", () => {
    try {
      textarea.value = JSON.stringify(JSON.parse(textarea.value), null, 2);
      errors.replaceChildren();
    } catch (err) {
      errors.replaceChildren(callout("error", `Not valid JSON: ${err.message}`));
    }
  });

  const set = (spec) => {
    textarea.value = JSON.stringify(spec, null, 2);
    sessionStorage.setItem(draftKey, textarea.value);
    errors.replaceChildren();
    idempotencyKey = uid();
  };

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let spec;
    try {
      spec = JSON.parse(textarea.value);
    } catch (err) {
      errors.replaceChildren(callout("error", `Not valid JSON: ${err.message}`));
      return;
    }
    submit.disabled = true;
    errors.replaceChildren();
    try {
      const job = await api("/v1/jobs", { method: "POST", json: spec, headers: { "Idempotency-Key": idempotencyKey }, signal: page.signal });
      idempotencyKey = uid();
      sessionStorage.removeItem(draftKey);
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (isAbort(err)) return;
      const list = Array.isArray(err.details)
        ? h("ul", { class: "field-errors" }, err.details.map((d) => h("li", { data: { field: d.field || "" } },
          h("code", { text: (d.field || "").replace(/^body\.?/, "") || "(the body)" }), " ", h("span", { text: d.message }))))
        : null;
      const retry = err.headers && err.headers.get && err.headers.get("Retry-After");
      errors.replaceChildren(callout("error", h("div", { text: err.message + (retry ? ` (retry after ${retry} s)` : "") }), list));
    } finally {
      submit.disabled = false;
    }
  });

  const from = query.get("from");
  const dataset = query.get("dataset");
  const list = await presets();
  presetBar.append(...list.map((p) => h("button", { type: "button", class: "chip", text: p.label, data: { preset: p.spec.name || p.label },
    on: { click: () => set(p.spec) } })));
  if (from) {
    const job = await api(`/v1/jobs/${encodeURIComponent(from)}`, { signal: page.signal });
    set(job.spec);
  } else if (dataset) {
    let name = dataset;
    try {
      name = (await api(`/v1/datasets/${encodeURIComponent(dataset)}`, { signal: page.signal })).name;
    } catch (err) {
      if (isAbort(err)) throw err;
    }
    set({ name: String(name).replace(/[^\w.\- ]/g, "-").slice(0, 190), data: { dataset }, epochs: 30 });
  } else {
    textarea.value = sessionStorage.getItem(draftKey) || JSON.stringify((list[0] && list[0].spec) || { data: { dataset: "iris" }, epochs: 30 }, null, 2);
  }
  textarea.focus();
}

// --- datasets -------------------------------------------------------------------------------------------

async function datasetsPage(page, view) {
  const file = h("input", { type: "file", id: "ds-file", name: "file", accept: ".csv,.npz,text/csv", required: true });
  const name = h("input", { type: "text", id: "ds-name", name: "name", required: true, maxlength: "200", pattern: "[\\w.\\- ]+",
    placeholder: "houses" });
  const target = h("input", { type: "text", id: "ds-target", name: "target", maxlength: "200", placeholder: "price (CSV only)" });
  const task = h("select", { id: "ds-task", name: "task" }, ["auto", "classification", "binary", "regression"].map((t) => h("option", { value: t, text: t })));
  const submit = h("button", { type: "submit", id: "ds-submit", class: "primary", text: "Upload" });
  const result = h("div", { id: "ds-result", role: "status" });
  file.addEventListener("change", () => {
    const f = file.files[0];
    if (f && !name.value) name.value = f.name.replace(/\.(csv|npz)$/i, "").replace(/[^\w.\- ]/g, "-").slice(0, 200);
  });
  const form = h("form", { id: "upload-form", class: "card" },
    h("h2", { text: "Upload" }),
    h("p", { class: "muted" }, "A CSV with a header row (every cell a number; name the column to learn as target), or an NPZ with arrays ",
      h("code", { text: "x" }), " (rows, features) and ", h("code", { text: "y" }), " (rows,). ",
      h("code", { text: "auto" }), " reads integer targets with 2 values as binary, 3–50 as classes, anything else as regression."),
    h("div", { class: "form-grid" },
      h("label", { class: "field" }, h("span", { text: "File" }), file),
      h("label", { class: "field" }, h("span", { text: "Name" }), name),
      h("label", { class: "field" }, h("span", { text: "Target column" }), target),
      h("label", { class: "field" }, h("span", { text: "Task" }), task)),
    result,
    h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!file.files.length) return;
    const body = new FormData();
    body.append("file", file.files[0]);
    body.append("name", name.value.trim());
    body.append("task", task.value);
    if (target.value.trim()) body.append("target", target.value.trim());
    submit.disabled = true;
    result.replaceChildren(h("p", { class: "muted", text: "Uploading…" }));
    try {
      const ds = await api("/v1/datasets", { method: "POST", body, signal: page.signal });
      result.replaceChildren(callout("ok", `Stored ${ds.name}: ${ds.rows} rows, ${ds.features} features, ${ds.task}. `,
        h("a", { href: `#/new?dataset=${encodeURIComponent(ds.id)}`, text: "Train on it" })));
      form.reset();
      await refresh();
    } catch (err) {
      if (isAbort(err)) return;
      const list = Array.isArray(err.details)
        ? h("ul", { class: "field-errors" }, err.details.map((d) => h("li", {}, h("code", { text: (d.field || "").replace(/^body\.?/, "") }), " ", d.message)))
        : null;
      result.replaceChildren(callout("error", h("div", { text: err.message }), list));
    } finally {
      submit.disabled = false;
    }
  });

  const tbody = h("tbody");
  const table = h("table", { class: "table", id: "datasets-table" },
    h("thead", {}, h("tr", {}, ["Name", "Id", "Task", "Rows", "Features", "Classes", "Uploaded", ""].map((t) => h("th", { text: t })))), tbody);
  const empty = h("p", { class: "empty-state", text: "No uploads yet.", hidden: true });
  const more = h("button", { type: "button", class: "ghost", text: "Load more", hidden: true });
  let items = [];
  let cursor = null;
  const row = (d) => h("tr", { data: { datasetId: d.id } },
    h("td", { class: "name", text: d.name }),
    h("td", { class: "mono" }, d.id.slice(0, 8), " ", copyButton(d.id, "copy id")),
    h("td", {}, h("span", { class: "tag", text: d.task })),
    h("td", { class: "num", text: String(d.rows) }),
    h("td", { class: "num", text: String(d.features) }),
    h("td", { title: Array.isArray(d.labels) ? `labels: ${d.labels.join(", ")}` : "" }, d.classes ?? "–",
      Array.isArray(d.labels) ? h("div", { class: "sub", text: d.labels.slice(0, 6).join(", ") + (d.labels.length > 6 ? ", …" : "") }) : null),
    h("td", {}, timeEl(d.created_at)),
    h("td", {}, h("a", { class: "button small", href: `#/new?dataset=${encodeURIComponent(d.id)}`, text: "Train" })));
  const draw = () => {
    tbody.replaceChildren(...items.map(row));
    table.hidden = !items.length;
    empty.hidden = items.length > 0;
    more.hidden = !cursor;
  };
  async function refresh() {
    const body = await api(`/v1/datasets${qs({ limit: Math.min(200, Math.max(50, items.length)) })}`, { signal: page.signal });
    items = body.items;
    cursor = body.next_cursor;
    draw();
  }
  more.addEventListener("click", async () => {
    try {
      const body = await api(`/v1/datasets${qs({ limit: 50, cursor })}`, { signal: page.signal });
      items = [...items, ...body.items];
      cursor = body.next_cursor;
      draw();
    } catch (err) {
      if (!isAbort(err)) toast(err.message, "error");
    }
  });

  view.append(
    h("div", { class: "page-head" }, h("h1", { text: "Datasets" })),
    form,
    h("section", { class: "card" }, h("h2", { text: "Your uploads" }), h("div", { class: "table-wrap" }, table), empty, more),
    h("section", { class: "card" }, h("h2", { text: "Built in" }),
      h("p", { class: "muted", text: "Shipped with kiln (no download at run time); generated ones take data.samples." }),
      h("div", { class: "chips" }, BUILTIN_DATASETS.map((d) => h("a", { class: "chip", href: `#/new?dataset=${d}`, text: d, title: `Train on ${d}` })))));
  await refresh();
}

// --- workers --------------------------------------------------------------------------------------------

async function workersPage(page, view) {
  const body = h("div", { id: "workers" });
  view.append(h("div", { class: "page-head" }, h("h1", { text: "Workers" })), body);
  let unavailable = false;
  page.every(5000, async () => {
    if (unavailable) return;
    let answer;
    try {
      answer = await api("/v1/workers", { signal: page.signal });
    } catch (err) {
      if (err instanceof ApiError && (err.status === 404 || err.status === 405)) {
        unavailable = true;
        body.replaceChildren(callout("info", h("span", { id: "workers-unavailable", text: "worker registry not available on this server" }),
          h("div", { class: "sub" }, "This kiln does not serve ", h("code", { text: "GET /v1/workers" }), " yet. ",
            "The job pages show which worker ran each job.")));
        return;
      }
      throw err;
    }
    const workers = Array.isArray(answer) ? answer : answer.items || answer.workers || [];
    if (!workers.length) {
      body.replaceChildren(h("p", { class: "empty-state", text: "No worker has reported in. Start one with `kiln worker`." }));
      return;
    }
    const list = (v) => (Array.isArray(v) ? v : v === null || v === undefined ? [] : [v]);
    const device = (d) => {
      if (typeof d === "string") return d;
      const parts = [d.id || d.kind, d.name && d.name !== d.id ? d.name : null,
        d.cores ? `${d.cores} cores` : null, d.memory_gb ? `${fmt(d.memory_gb, 3)} GB` : null];
      return parts.filter(Boolean).join(" · ");
    };
    const running = (w) => {
      const mine = Array.isArray(w.running_jobs) ? w.running_jobs : [];
      const count = typeof w.running === "number" ? w.running : typeof w.running_jobs === "number" ? w.running_jobs : mine.length;
      return [h("span", { class: "num", text: `${count} / ${w.concurrency ?? "?"}` }),
        mine.map((id) => h("div", {}, h("a", { class: "mono", href: `#/jobs/${encodeURIComponent(id)}`, text: String(id).slice(0, 8) })))];
    };
    body.replaceChildren(h("div", { class: "table-wrap" }, h("table", { class: "table", id: "workers-table" },
      h("thead", {}, h("tr", {}, ["Worker", "State", "Queues", "Devices", "Running", "Last heartbeat", "Started", "Version"].map((t) => h("th", { text: t })))),
      h("tbody", {}, workers.map((w) => {
        const name = w.hostname || w.name || w.host || "?";
        return h("tr", { data: { worker: name } },
          h("td", { class: "name" }, h("div", { class: "mono", text: name }),
            w.host && w.host !== name ? h("div", { class: "sub", text: `${w.host}${w.pid ? ` · pid ${w.pid}` : ""}` }) : null),
          h("td", {}, badge(w.state || "unknown")),
          h("td", {}, list(w.queues).map((q) => h("span", { class: "tag", text: q }))),
          h("td", {}, list(w.devices).map((d) => h("div", { class: "sub", text: device(d) }))),
          h("td", {}, running(w)),
          h("td", {}, timeEl(w.last_heartbeat || w.last_seen)),
          h("td", {}, timeEl(w.started_at)),
          h("td", { class: "sub", text: w.version || "–" }));
      })))));
  });
}

// --- start ----------------------------------------------------------------------------------------------

function start() {
  let theme = localStorage.getItem("kiln.theme") || "auto";
  applyTheme(theme);
  document.getElementById("theme-toggle").addEventListener("click", () => {
    theme = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
    localStorage.setItem("kiln.theme", theme);
    applyTheme(theme);
  });
  document.getElementById("signout").addEventListener("click", () => {
    clearKey();
    flash = { text: "Signed out.", kind: "info" };
    if (location.hash === "#/signin") route();
    else location.hash = "#/signin";
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
