// Small hand-written SVG charts: a line chart (several series, log scale, EMA smoothing, hover read-out,
// clickable legend) and a sparkline. No dependencies.

const NS = "http://www.w3.org/2000/svg";

export function svgEl(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

/** A value as a person reads it: 4 significant digits, exponent for the very small or very large. */
export function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (!Number.isFinite(v)) return v > 0 ? "∞" : "−∞";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-4 || a >= 1e6)) return v.toExponential(Math.max(0, digits - 2)).replace("e+", "e");
  if (Number.isInteger(v) && a < 1e6) return String(v);
  return String(Number(v.toPrecision(digits)));
}

/** Round tick positions covering [lo, hi], about `count` of them (the 1-2-5 rule). */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => raw <= s) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

/** TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0. */
export function smooth(points, weight) {
  if (!(weight > 0)) return points;
  let last = 0;
  let n = 0;
  return points.map(([x, y]) => {
    n += 1;
    last = last * weight + (1 - weight) * y;
    return [x, last / (1 - weight ** n)];
  });
}

/** At most ~2 points per pixel column: keep each column's first, min, max and last (spikes survive). */
function decimate(points, toPx, width) {
  if (points.length <= width * 2) return points;
  const out = [];
  let column = null;
  let bucket = [];
  const flush = () => {
    if (!bucket.length) return;
    let min = bucket[0];
    let max = bucket[0];
    for (const p of bucket) {
      if (p[1] < min[1]) min = p;
      if (p[1] > max[1]) max = p;
    }
    const keep = [bucket[0], min, max, bucket[bucket.length - 1]].sort((a, b) => a[0] - b[0]);
    for (const p of keep) if (out[out.length - 1] !== p) out.push(p);
    bucket = [];
  };
  for (const p of points) {
    const c = Math.floor(toPx(p[0]));
    if (c !== column) {
      flush();
      column = c;
    }
    bucket.push(p);
  }
  flush();
  return out;
}

const MARGIN = { top: 10, right: 14, bottom: 26, left: 56 };

/**
 * A line chart inside `root` (a container element). Series: [{key, label, points: [[x, y], ...]}]; the n-th
 * series is drawn in colour class s<n>. The <svg> carries data-points (the longest series' length) and each
 * path data-series/data-n, so tests and people alike can tell how much is plotted.
 */
export class LineChart {
  constructor(root, { title, metric, xLabel = "epoch", logY = false, allowLog = true, height = 220, xLog = false }) {
    this.root = root;
    this.metric = metric;
    this.xLabel = xLabel;
    this.height = height;
    this.xLog = xLog;
    this.integerX = !xLog && xLabel === "epoch"; // epochs are whole numbers: no tick at 1.5
    this.series = [];
    this.hidden = new Set();
    this.smoothing = 0;
    this.logY = allowLog && (localStorage.getItem(`kiln.log.${metric}`) ?? String(logY)) === "true";
    this.frame = 0;
    this.width = 0;

    root.classList.add("chart-card");
    root.dataset.metric = metric;
    const head = document.createElement("div");
    head.className = "chart-head";
    const h = document.createElement("h3");
    h.textContent = title;
    this.legend = document.createElement("div");
    this.legend.className = "legend";
    head.append(h, this.legend);
    if (allowLog) {
      const log = document.createElement("button");
      log.type = "button";
      log.className = "chip small";
      log.textContent = "log";
      log.title = "Logarithmic y axis";
      log.setAttribute("aria-pressed", String(this.logY));
      log.addEventListener("click", () => {
        this.logY = !this.logY;
        log.setAttribute("aria-pressed", String(this.logY));
        localStorage.setItem(`kiln.log.${metric}`, String(this.logY));
        this.schedule();
      });
      head.append(log);
    }
    this.plot = document.createElement("div");
    this.plot.className = "plot";
    this.svg = svgEl("svg", { class: "chart", role: "img", "aria-label": title, "data-metric": metric });
    this.tip = document.createElement("div");
    this.tip.className = "tip";
    this.tip.hidden = true;
    this.plot.append(this.svg, this.tip);
    root.append(head, this.plot);

    this.resize = new ResizeObserver((entries) => {
      const w = Math.floor(entries[0].contentRect.width);
      if (w && w !== this.width) {
        this.width = w;
        this.schedule();
      }
    });
    this.resize.observe(this.plot);
  }

  setSeries(series) {
    this.series = series;
    this.schedule();
  }

  setSmoothing(weight) {
    this.smoothing = weight;
    this.schedule();
  }

  /** Redraws at most once per frame, however many epochs arrive in between. */
  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  destroy() {
    this.resize.disconnect();
    if (this.frame) cancelAnimationFrame(this.frame);
  }

  renderLegend() {
    this.legend.replaceChildren();
    this.series.forEach((s, n) => {
      const i = s.color ?? n;
      const item = document.createElement("button");
      item.type = "button";
      item.className = `legend-item s${i}` + (this.hidden.has(s.key) ? " off" : "");
      item.dataset.series = s.key;
      item.title = this.hidden.has(s.key) ? `Show ${s.label}` : `Hide ${s.label}`;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      const label = document.createElement("span");
      label.textContent = s.label;
      item.append(swatch, label);
      item.addEventListener("click", () => {
        if (this.hidden.has(s.key)) this.hidden.delete(s.key);
        else this.hidden.add(s.key);
        this.render();
      });
      this.legend.append(item);
    });
  }

  render() {
    this.renderLegend();
    const width = this.width || this.plot.clientWidth || 480;
    const height = this.height;
    const svg = this.svg;
    svg.replaceChildren();
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const ok = (y) => Number.isFinite(y) && (!this.logY || y > 0);
    const okX = (x) => Number.isFinite(x) && (!this.xLog || x > 0);
    const all = this.series.map((s) => s.points.filter(([x, y]) => okX(x) && ok(y)));
    svg.dataset.points = String(this.series.reduce((n, s) => Math.max(n, s.points.length), 0));
    const visible = all.filter((_, n) => !this.hidden.has(this.series[n].key));
    const flat = visible.flat();
    const innerW = Math.max(10, width - MARGIN.left - MARGIN.right);
    const innerH = height - MARGIN.top - MARGIN.bottom;
    if (!flat.length) {
      svgEl("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle" }, svg).textContent =
        this.series.some((s) => s.points.length) ? "no positive values to draw on a log scale" : "waiting for the first epoch…";
      this.series.forEach((s, n) => svgEl("path", { class: `line s${s.color ?? n}`, d: "", "data-series": s.key, "data-n": s.points.length }, svg));
      return;
    }
    const ty = this.logY ? Math.log10 : (v) => v;
    const tx = this.xLog ? Math.log10 : (v) => v;
    let [x0, x1] = extent(flat.map((p) => tx(p[0])));
    if (x1 - x0 < 1e-12) {
      x0 -= this.xLog ? 0.5 : 1;
      x1 += this.xLog ? 0.5 : 1;
    }
    let [y0, y1] = extent(flat.map((p) => ty(p[1])));
    if (y1 - y0 < 1e-12) {
      const pad = Math.abs(y0) * 0.1 || (this.logY ? 0.5 : 1);
      y0 -= pad;
      y1 += pad;
    } else {
      const pad = (y1 - y0) * 0.06;
      y0 -= pad;
      y1 += pad;
    }
    const px = (x) => MARGIN.left + ((tx(x) - x0) / (x1 - x0)) * innerW;
    const py = (y) => MARGIN.top + innerH - ((ty(y) - y0) / (y1 - y0)) * innerH;

    // grid and axes
    const grid = svgEl("g", { class: "grid" }, svg);
    const axis = svgEl("g", { class: "axis" }, svg);
    const yTicks = this.logY ? logTicks(y0, y1) : niceTicks(y0, y1, Math.max(2, Math.round(innerH / 45)));
    for (const t of yTicks) {
      const value = this.logY ? 10 ** t : t;
      if (t < y0 - 1e-12 || t > y1 + 1e-12) continue;
      const y = py(value);
      svgEl("line", { x1: MARGIN.left, x2: MARGIN.left + innerW, y1: y, y2: y }, grid);
      svgEl("text", { x: MARGIN.left - 6, y: y + 4, "text-anchor": "end" }, axis).textContent = fmt(value, 3);
    }
    const xTicks = this.xLog
      ? logTicks(x0, x1).map((t) => 10 ** t)
      : niceTicks(x0, x1, Math.max(2, Math.round(innerW / 80))).filter((t) => !this.integerX || Number.isInteger(t));
    for (const t of xTicks) {
      if (tx(t) < x0 - 1e-12 || tx(t) > x1 + 1e-12) continue;
      const x = px(t);
      svgEl("line", { x1: x, x2: x, y1: MARGIN.top, y2: MARGIN.top + innerH, class: "v" }, grid);
      svgEl("text", { x, y: height - 8, "text-anchor": "middle" }, axis).textContent = fmt(t, 3);
    }
    svgEl("line", { x1: MARGIN.left, x2: MARGIN.left + innerW, y1: MARGIN.top + innerH, y2: MARGIN.top + innerH, class: "base" }, axis);
    svgEl("text", { x: MARGIN.left + innerW, y: height - 8, "text-anchor": "end", class: "xlabel" }, axis).textContent =
      xTicks.length > 1 ? "" : this.xLabel;

    // lines
    const lines = svgEl("g", { class: "lines" }, svg);
    const drawn = [];
    this.series.forEach((s, n) => {
      const pts = all[n];
      const i = s.color ?? n;
      const hidden = this.hidden.has(s.key);
      const smoothed = smooth(pts, this.smoothing);
      const path = (points) =>
        decimate(points, (x) => px(x), innerW)
          .map(([x, y], j) => `${j ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`)
          .join("");
      if (this.smoothing > 0 && !hidden) svgEl("path", { class: `line raw s${i}`, d: path(pts) }, lines);
      svgEl("path", {
        class: `line s${i}` + (hidden ? " off" : ""),
        d: hidden ? "" : path(smoothed),
        "data-series": s.key,
        "data-n": s.points.length,
      }, lines);
      if (!hidden && smoothed.length) {
        const [lx, ly] = smoothed[smoothed.length - 1];
        svgEl("circle", { class: `dot s${i}`, cx: px(lx).toFixed(1), cy: py(ly).toFixed(1), r: 2.5 }, lines);
        drawn.push({ s, i, pts, smoothed });
      }
    });

    // hover read-out: the nearest x, every visible series' value there
    const cross = svgEl("g", { class: "cross", visibility: "hidden" }, svg);
    const vline = svgEl("line", { y1: MARGIN.top, y2: MARGIN.top + innerH }, cross);
    const marks = drawn.map(({ i }) => svgEl("circle", { r: 3.5, class: `mark s${i}` }, cross));
    const hit = svgEl("rect", { x: MARGIN.left, y: MARGIN.top, width: innerW, height: innerH, class: "hit" }, svg);
    const xs = [...new Set(drawn.flatMap((d) => d.pts.map((p) => p[0])))].sort((a, b) => a - b);
    const nearest = (arr, x) => {
      let lo = 0;
      let hi = arr.length - 1;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (arr[mid] < x) lo = mid + 1;
        else hi = mid;
      }
      if (lo > 0 && Math.abs(arr[lo - 1] - x) <= Math.abs(arr[lo] - x)) lo -= 1;
      return arr[lo];
    };
    const move = (event) => {
      if (!xs.length) return;
      const rect = svg.getBoundingClientRect();
      const mx = event.clientX - rect.left;
      const xv = this.xLog
        ? 10 ** (x0 + ((mx - MARGIN.left) / innerW) * (x1 - x0))
        : x0 + ((mx - MARGIN.left) / innerW) * (x1 - x0);
      const x = nearest(xs, xv);
      const cx = px(x);
      vline.setAttribute("x1", cx);
      vline.setAttribute("x2", cx);
      cross.setAttribute("visibility", "visible");
      const rows = [];
      drawn.forEach((d, k) => {
        const j = d.pts.findIndex((p) => p[0] === x);
        if (j < 0) {
          marks[k].setAttribute("visibility", "hidden");
          return;
        }
        const y = d.smoothed[j][1];
        marks[k].setAttribute("visibility", "visible");
        marks[k].setAttribute("cx", cx);
        marks[k].setAttribute("cy", py(y));
        rows.push([d.i, d.s.label, d.pts[j][1], this.smoothing > 0 ? y : null]);
      });
      this.tip.replaceChildren();
      const head = document.createElement("div");
      head.className = "tip-head";
      head.textContent = `${this.xLabel} ${fmt(x)}`;
      this.tip.append(head);
      for (const [i, label, raw, sm] of rows) {
        const row = document.createElement("div");
        row.className = `tip-row s${i}`;
        const sw = document.createElement("span");
        sw.className = "swatch";
        const name = document.createElement("span");
        name.textContent = label;
        const val = document.createElement("b");
        val.textContent = sm === null ? fmt(raw, 5) : `${fmt(sm, 5)} (${fmt(raw, 5)})`;
        row.append(sw, name, val);
        this.tip.append(row);
      }
      this.tip.hidden = false;
      const tipW = this.tip.offsetWidth;
      const left = cx + 14 + tipW > width ? cx - 14 - tipW : cx + 14;
      this.tip.style.left = `${Math.max(0, left)}px`;
      this.tip.style.top = `${MARGIN.top + 4}px`;
    };
    hit.addEventListener("pointermove", move);
    hit.addEventListener("pointerleave", () => {
      cross.setAttribute("visibility", "hidden");
      this.tip.hidden = true;
    });
  }
}

function extent(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

function logTicks(lo, hi) {
  // lo, hi in log10 units: every power of ten between, with 2 and 5 when the range is under two decades
  const out = [];
  const few = hi - lo < 2;
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of few ? [1, 2, 5] : [1]) {
      const t = e + Math.log10(m);
      if (t >= lo && t <= hi) out.push(t);
    }
  }
  return out.length ? out : [lo, hi];
}

/** A tiny line (no axes): the shape of a run at a glance. points: [[x, y], ...] (x: the epoch), or plain ys. */
export function sparkline(points, { width = 96, height = 24, label = "" } = {}) {
  const pairs = points.map((p, i) => (Array.isArray(p) ? p : [i, p])).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const svg = svgEl("svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}`, "data-n": pairs.length });
  if (label) svgEl("title", {}, svg).textContent = label;
  if (!pairs.length) return svg;
  const [x0, x1] = extent(pairs.map((p) => p[0]));
  const [lo, hi] = extent(pairs.map((p) => p[1]));
  const px = (x) => 2 + (x1 > x0 ? ((x - x0) / (x1 - x0)) * (width - 4) : (width - 4) / 2);
  const py = (y) => 2 + (height - 4) * (hi > lo ? 1 - (y - lo) / (hi - lo) : 0.5);
  svgEl("polyline", { points: pairs.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ") }, svg);
  const [lx, ly] = pairs[pairs.length - 1];
  svgEl("circle", { cx: px(lx).toFixed(1), cy: py(ly).toFixed(1), r: 1.8 }, svg);
  return svg;
}
