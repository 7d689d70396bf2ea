// Drawing of a Phase Trainer metrics payload on a <canvas>.
//
// No ComfyUI imports on purpose: the same module runs inside the node widget (web/phase_trainer.js) and on a
// plain test page (tests/widget_page/), where headless Chromium checks the pixels.
//
// Payload (trainer/metrics.py `metrics_payload`):
//   {columns: [...names], rows: [[number|null per column], ...], phases: [{name, start_step, alpha, expert?}],
//    events: [{step, event, detail}], job, summary?: [lines]}
// summary: what the run ended with (the stop advice, the best LoRA, the files), shown under the node's plot.
// Columns are always looked up by name: the Python side may append new ones.

export const THEME = {
  background: "#15171c",
  frame: "#3a3f4b",
  grid: "rgba(255,255,255,0.06)",
  text: "#c9d1d9",
  mutedText: "#8b949e",
  // Phase bands cycle through these hues, drawn with bandAlpha over the background.
  bands: ["#3b82f6", "#a855f7", "#14b8a6", "#f59e0b"],
  bandAlpha: 0.16,
  transition: "#ff5555",
  // Per expert (single-expert runs use the first): smoothed loss is opaque, raw loss uses rawLossAlpha.
  loss: ["#4ea1ff", "#ff8c42"],
  rawLossAlpha: 0.3,
  alpha: "#3fb950",
  val: "#ffffff",
  // The stop advice (suggest_stop): a dashed line where it fired and a star on the best validation loss.
  stop: "#ffb000",
  stats: {
    loss_slope: "#bc8cff",
    loss_r2: "#e3d74a",
    loss_cv: "#39d0d8",
    gradient_stability: "#ff79c6",
  },
  tooltipBg: "#0d1117",
  tooltipBorder: "#6e7681",
  font: "11px system-ui, sans-serif",
};

// Toggleable statistics, drawn on a secondary axis normalised to the plot height.
export const STAT_SERIES = [
  { key: "loss_slope", label: "slope" },
  { key: "loss_r2", label: "R²", fixedRange: [0, 1] },
  { key: "loss_cv", label: "CV" },
  { key: "gradient_stability", label: "stability", fixedRange: [0, 1] },
];

const EXPERT_NAMES = { 0: "high_noise", 1: "low_noise" };
// The smoothed loss is an EMA over steps whose time constant follows the run's length (a 60th of the step
// span, 3..250 steps), so a long run is as readable as a short one at the same width. It decays by
// beta^(step gap), so a decimated (stored) payload smooths like the full one.
const EMA_SPAN_FRACTION = 1 / 60;
const EMA_TAU_RANGE = [3, 250];
const EMPTY_TEXT = "waiting for metrics…";

// ---------------------------------------------------------------------------------------------------------
// Data store: one array per column, appended in place (no copying on append).

function finiteOrNull(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

export class MetricsData {
  constructor(payload) {
    this.clear();
    if (payload) this.setPayload(payload);
  }

  clear() {
    this.columns = [];
    this.cols = Object.create(null);
    this.length = 0;
    this.phases = [];
    this.events = [];
    this.job = null;
    this.summary = [];
    this.stepsSorted = true;
    this.version = (this.version || 0) + 1;
  }

  setPayload(payload) {
    this.clear();
    if (!payload) return;
    this.phases = Array.isArray(payload.phases) ? payload.phases : [];
    this.events = Array.isArray(payload.events) ? payload.events.slice() : [];
    this.job = payload.job ?? null;
    this.summary = Array.isArray(payload.summary) ? payload.summary.map(String) : [];
    this.append(payload.columns || [], payload.rows || []);
  }

  column(name) {
    return this.cols[name] || null;
  }

  _ensureColumn(name) {
    if (!this.cols[name]) {
      this.cols[name] = new Array(this.length).fill(null);
      this.columns.push(name);
    }
    return this.cols[name];
  }

  append(columns, rows) {
    if (!rows || rows.length === 0) return;
    columns = columns && columns.length ? columns : this.columns;
    const targets = columns.map((name) => this._ensureColumn(name));
    const missing = this.columns.filter((name) => !columns.includes(name)).map((name) => this.cols[name]);
    const step = this.cols.step;
    for (const row of rows) {
      for (let k = 0; k < targets.length; k++) targets[k].push(finiteOrNull(row[k]));
      for (const arr of missing) arr.push(null);
      const i = this.length++;
      if (step && i > 0 && step[i] !== null && step[i - 1] !== null && step[i] < step[i - 1]) {
        this.stepsSorted = false;
      }
    }
    this.version++;
  }

  mergeEvents(events) {
    if (!Array.isArray(events)) return;
    const seen = new Set(this.events.map((e) => `${e.step}|${e.event}`));
    for (const e of events) {
      const key = `${e.step}|${e.event}`;
      if (!seen.has(key)) {
        seen.add(key);
        this.events.push(e);
      }
    }
    this.version++;
  }

  toPayload() {
    const rows = new Array(this.length);
    const arrays = this.columns.map((n) => this.cols[n]);
    for (let i = 0; i < this.length; i++) rows[i] = arrays.map((a) => a[i]);
    const payload = { columns: this.columns.slice(), rows, phases: this.phases, events: this.events, job: this.job };
    if (this.summary.length) payload.summary = this.summary.slice();
    return payload;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Derived structures (series per expert, phase bands, transitions, ranges), recomputed once per data version.

function quantile(sorted, q) {
  if (sorted.length === 0) return null;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.min(sorted.length - 1, lo + 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

// 1st..99th percentile, so a single spike does not flatten the curve.
function robustRange(arrays, indices, maxSamples = 4000) {
  const n = indices.length;
  const stride = Math.max(1, Math.floor(n / maxSamples));
  const pool = [];
  for (const arr of arrays) {
    if (!arr) continue;
    for (let j = 0; j < n; j += stride) {
      const v = arr[indices[j]];
      if (v !== null) pool.push(v);
    }
  }
  if (pool.length === 0) return null;
  const sorted = Float64Array.from(pool).sort();
  let lo = quantile(sorted, 0.01);
  let hi = quantile(sorted, 0.99);
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    lo -= pad;
    hi += pad;
  }
  return [lo, hi];
}

function expertKey(value) {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return EXPERT_NAMES[value] ?? `expert ${value}`;
  return String(value);
}

// The phase a row is in: per-expert phases are looked up by expert and their own index, others by index.
function phaseOf(phases, phaseIdx, expert) {
  const name = expertKey(expert);
  if (name !== null && phases.some((p) => p && p.expert !== undefined && p.expert !== null)) {
    const mine = phases.filter((p) => p && expertKey(p.expert) === name);
    return mine.find((p) => p.phase_idx === phaseIdx) || mine[phaseIdx] || null;
  }
  return phases[phaseIdx] || null;
}

function phaseAlphaText(phase) {
  const a = phase && phase.alpha;
  if (a === null || a === undefined) return "";
  if (typeof a === "number") return `α${formatNumber(a)}`;
  const parts = Object.entries(a).filter(([, v]) => typeof v === "number");
  if (parts.length === 1) return `α${formatNumber(parts[0][1])}`;
  return parts.map(([k, v]) => `${k} α${formatNumber(v)}`).join(" ");
}

// Bias-corrected EMA of the loss, per series, over steps (not rows).
function smoothLoss(data, series, stepAt, span, fixedTau, clamp) {
  const loss = data.column("loss");
  const ema = new Array(data.length).fill(null);
  if (!loss) return ema;
  const tau = fixedTau || Math.min(EMA_TAU_RANGE[1], Math.max(EMA_TAU_RANGE[0], span * EMA_SPAN_FRACTION));
  for (const s of series) {
    let m = 0;
    let n = 0;
    let last = null;
    for (const i of s.idx) {
      let v = loss[i];
      if (v === null) continue;
      if (clamp) v = Math.min(clamp[1], Math.max(clamp[0], v));
      const step = stepAt(i);
      const decay = Math.exp(-(last === null ? 1 : Math.max(1, step - last)) / tau);
      m = decay * m + (1 - decay) * v;
      n = decay * n + (1 - decay);
      last = step;
      ema[i] = m / n;
    }
  }
  return ema;
}

// An event's own detail. Several events at one step share one detail keyed by event name
// ({"suggest_stop": {...}, "checkpoint": {...}}); a single event's detail is the object itself.
function eventDetail(event, name) {
  const d = event && event.detail;
  if (!d || typeof d !== "object") return {};
  return d[name] && typeof d[name] === "object" ? d[name] : d;
}

function finiteNumber(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

// Stop advice: one entry per suggest_stop event, with the best step and validation loss it names. A payload
// built from the metrics tensor has no event details: then the best is the lowest val_loss up to the advice
// (of the same expert).
function stopAdvice(data, stepAt, allIdx, expertAt) {
  const val = data.column("val_loss");
  const expertCol = data.column("expert_idx");
  const out = [];
  for (const e of data.events) {
    if (!e || e.event !== "suggest_stop" || typeof e.step !== "number") continue;
    const detail = eventDetail(e, "suggest_stop");
    const expert = expertAt(e.step);
    let bestStep = finiteNumber(detail.best_step);
    let bestVal = finiteNumber(detail.best_val_loss);
    if ((bestStep === null || bestVal === null) && val) {
      for (const i of allIdx) {
        const s = stepAt(i);
        if (val[i] === null || s > e.step || (expertCol && expertCol[i] !== expert)) continue;
        if (bestVal === null || val[i] < bestVal) {
          bestVal = val[i];
          bestStep = s;
        }
      }
    }
    out.push({ step: e.step, bestStep, bestVal, trend: typeof detail.trend === "string" ? detail.trend : null,
      expert: expertKey(expert) });
  }
  return out.sort((a, b) => a.step - b.step);
}

function derive(data, opts = {}) {
  const n = data.length;
  const step = data.column("step");
  const stepAt = step ? (i) => step[i] : (i) => i;
  const expertCol = data.column("expert_idx");
  const phaseCol = data.column("phase_idx");

  // Series: one per expert when more than one expert appears, else one for all rows.
  const byExpert = new Map();
  for (let i = 0; i < n; i++) {
    if (stepAt(i) === null) continue;
    const key = expertCol ? expertCol[i] : null;
    if (!byExpert.has(key)) byExpert.set(key, []);
    byExpert.get(key).push(i);
  }
  const expertKeys = [...byExpert.keys()].filter((k) => k !== null).sort((a, b) => a - b);
  let series;
  if (expertKeys.length > 1) {
    series = expertKeys.map((k, j) => ({ key: k, label: expertKey(k), slot: j, idx: byExpert.get(k) }));
  } else {
    const all = [];
    for (let i = 0; i < n; i++) if (stepAt(i) !== null) all.push(i);
    series = [{ key: expertKeys[0] ?? null, label: "loss", slot: 0, idx: all }];
  }
  const allIdx = [];
  for (const s of series) for (const i of s.idx) allIdx.push(i);

  let xMin = Infinity;
  let xMax = -Infinity;
  for (const i of allIdx) {
    const s = stepAt(i);
    if (s < xMin) xMin = s;
    if (s > xMax) xMax = s;
  }

  // Phase bands go in lanes when the phases are per expert (two experts with their own schedules).
  const phases = data.phases;
  const laneNames = [];
  for (const p of phases) {
    const lane = expertKey(p && p.expert);
    if (lane !== null && !laneNames.includes(lane)) laneNames.push(lane);
  }
  const lanes = laneNames.length > 1 ? laneNames : [null];
  const laneOf = (expert) => (lanes.length > 1 ? lanes.indexOf(expertKey(expert)) : -1);
  const rowAt = new Map(); // step -> first row (events name a step; the row says which expert ran it)
  for (const i of allIdx) if (!rowAt.has(stepAt(i))) rowAt.set(stepAt(i), i);
  const expertAt = (step) => (expertCol && rowAt.has(step) ? expertCol[rowAt.get(step)] : null);

  // Transitions: logged events plus every change of phase_idx within one expert's rows. With per-expert
  // lanes, an expert's transition is marked in its own lane only (lane -1: the whole height).
  const transitionMarks = new Map();
  const addTransition = (step, expert) => {
    const lane = laneOf(expert);
    transitionMarks.set(`${step}|${lane}`, { step, lane });
  };
  for (const e of data.events) {
    if (!e || e.event !== "transition" || typeof e.step !== "number") continue;
    const detail = eventDetail(e, "transition");
    addTransition(e.step, detail.expert ?? expertAt(e.step));
  }
  const firstRowOfPhase = new Map();
  if (phaseCol) {
    for (const s of series) {
      let last = null;
      for (const i of s.idx) {
        const p = phaseCol[i];
        if (p === null) continue;
        if (!firstRowOfPhase.has(p)) firstRowOfPhase.set(p, stepAt(i));
        if (last !== null && p !== last) addTransition(stepAt(i), expertCol ? expertCol[i] : null);
        last = p;
      }
    }
  }
  const transitions = new Set([...transitionMarks.values()].map((t) => t.step));
  const count = Math.max(phases.length, phaseCol ? Math.max(-1, ...firstRowOfPhase.keys()) + 1 : 0);
  const bands = [];
  for (let p = 0; p < count; p++) {
    const phase = phases[p] || { name: `phase ${p + 1}` };
    let start = typeof phase.start_step === "number" ? phase.start_step : firstRowOfPhase.get(p);
    if (start === undefined || start === null) continue; // not reached yet
    const lane = Math.max(0, laneOf(phase.expert));
    // Colour by the phase's place in its own schedule, so that both experts' first phase look alike.
    const colorIndex = typeof phase.phase_idx === "number" ? phase.phase_idx : p;
    bands.push({ index: p, colorIndex, name: String(phase.name ?? `phase ${p + 1}`), alphaText: phaseAlphaText(phase),
      start, end: null, lane });
  }
  for (let lane = 0; lane < lanes.length; lane++) {
    const inLane = bands.filter((b) => b.lane === lane).sort((a, b) => a.start - b.start);
    inLane.forEach((b, j) => {
      b.end = j + 1 < inLane.length ? inLane[j + 1].start : Math.max(xMax, b.start);
      if (j === 0 && lanes[lane] !== null) b.name = `${lanes[lane]}: ${b.name}`; // which expert the lane is
    });
  }
  for (const b of bands) {
    if (b.start < xMin) xMin = b.start;
  }

  if (!Number.isFinite(xMin)) {
    xMin = 0;
    xMax = 1;
  } else if (xMax <= xMin) {
    xMax = xMin + 1;
  }

  // Inputs to the EMA are clamped to a band around the robust range, so one spike cannot lift it for
  // hundreds of steps (the raw line still shows the spike).
  const rawRange = robustRange([data.column("loss")], allIdx);
  const clamp = rawRange ? [rawRange[0] - (rawRange[1] - rawRange[0]), rawRange[1] + (rawRange[1] - rawRange[0])] : null;
  const ema = smoothLoss(data, series, stepAt, xMax - xMin, opts.emaTau, clamp);
  const lossRange = robustRange([data.column("loss"), ema, data.column("val_loss")], allIdx);

  // Alpha: conv and linear columns; a second one only when it differs from the first somewhere.
  const alphaCols = [["conv_alpha", "α conv"], ["linear_alpha", "α linear"]]
    .map(([name, label]) => ({ label, values: data.column(name) }))
    .filter((a) => a.values && a.values.some((v) => v !== null));
  if (alphaCols.length === 2 && alphaCols[0].values.every((v, i) => v === alphaCols[1].values[i])) {
    alphaCols.pop();
    alphaCols[0].label = "α";
  }
  let alphaMax = 0;
  for (const a of alphaCols) for (const v of a.values) if (v !== null && v > alphaMax) alphaMax = v;

  const statRanges = {};
  for (const stat of STAT_SERIES) {
    const col = data.column(stat.key);
    if (!col) continue;
    statRanges[stat.key] = stat.fixedRange || robustRange([col], allIdx);
  }

  const stops = stopAdvice(data, stepAt, allIdx, expertAt);

  return { stepAt, series, allIdx, xMin, xMax, ema, transitions: [...transitions].sort((a, b) => a - b),
    transitionMarks: [...transitionMarks.values()].sort((a, b) => a.step - b.step || a.lane - b.lane), bands,
    lanes, lossRange, alphaCols, alphaMax, statRanges, stops };
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

export function formatNumber(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e6) return String(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  const stepSize = (norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10) * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / stepSize) * stepSize; t <= hi + stepSize * 1e-9; t += stepSize) {
    ticks.push(Math.abs(t) < stepSize * 1e-9 ? 0 : Number(t.toPrecision(12)));
  }
  return ticks;
}

function drawStar(ctx, cx, cy, r, fill, outline) {
  ctx.beginPath();
  for (let k = 0; k < 10; k++) {
    const radius = k % 2 ? r * 0.45 : r;
    const a = -Math.PI / 2 + (k * Math.PI) / 5;
    const x = cx + radius * Math.cos(a);
    const y = cy + radius * Math.sin(a);
    if (k) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
  }
  ctx.closePath();
  ctx.fillStyle = fill;
  ctx.fill();
  ctx.strokeStyle = outline;
  ctx.lineWidth = 1;
  ctx.stroke();
}

function withAlpha(ctx, alpha, fn) {
  const prev = ctx.globalAlpha;
  ctx.globalAlpha = prev * alpha;
  fn();
  ctx.globalAlpha = prev;
}

// Min/max per pixel column: at most two points per column however many rows there are.
function minMaxPath(ctx, idx, values, xOf, yOf, stepAt) {
  let bucket = null;
  let lo = null;
  let hi = null;
  let loFirst = true;
  let points = 0;
  let started = false;
  const flush = () => {
    if (bucket === null) return;
    const a = loFirst ? lo : hi;
    const b = loFirst ? hi : lo;
    if (!started) {
      ctx.moveTo(bucket + 0.5, yOf(a));
      started = true;
    } else {
      ctx.lineTo(bucket + 0.5, yOf(a));
    }
    points++;
    if (b !== a) {
      ctx.lineTo(bucket + 0.5, yOf(b));
      points++;
    }
  };
  for (const i of idx) {
    const v = values[i];
    if (v === null) continue;
    const col = Math.floor(xOf(stepAt(i)));
    if (col !== bucket) {
      flush();
      bucket = col;
      lo = hi = v;
      loFirst = true;
    } else if (v < lo) {
      lo = v;
      loFirst = false;
    } else if (v > hi) {
      hi = v;
    }
  }
  flush();
  return points;
}

// Last value per pixel column (for smooth series); `stepped` draws a step line (alpha).
function lastPerColumnPath(ctx, idx, values, xOf, yOf, stepAt, stepped = false) {
  let bucket = null;
  let lastV = null;
  let prevY = null;
  let points = 0;
  const emit = () => {
    if (bucket === null) return;
    const y = yOf(lastV);
    if (prevY === null) ctx.moveTo(bucket + 0.5, y);
    else {
      if (stepped && y !== prevY) ctx.lineTo(bucket + 0.5, prevY);
      ctx.lineTo(bucket + 0.5, y);
    }
    prevY = y;
    points++;
  };
  for (const i of idx) {
    const v = values[i];
    if (v === null) continue;
    const col = Math.floor(xOf(stepAt(i)));
    if (col !== bucket) {
      emit();
      bucket = col;
    }
    lastV = v;
  }
  emit();
  return points;
}

// ---------------------------------------------------------------------------------------------------------
// Rendering

function setupCanvas(canvas, cssWidth, cssHeight, dpr) {
  const w = Math.max(1, Math.round(cssWidth * dpr));
  const h = Math.max(1, Math.round(cssHeight * dpr));
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

function renderEmpty(ctx, theme, cssWidth, cssHeight, text) {
  ctx.fillStyle = theme.mutedText;
  ctx.font = theme.font.replace(/^\d+px/, "13px");
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(text, cssWidth / 2, cssHeight / 2);
}

// Legend and toggles, wrapped onto as many rows as the width needs. Returns the items with their positions.
const LEGEND_ROW_H = 18;

function layoutLegend(ctx, theme, d, state, data, left, right) {
  ctx.font = theme.font;
  const items = [];
  const add = (label, color, key, on, dashed = false) => {
    items.push({ label, color, key, on, dashed, w: 14 + ctx.measureText(label).width + 10 });
  };
  for (const s of d.series) add(s.label, theme.loss[s.slot % theme.loss.length], null, true);
  d.alphaCols.forEach((a, k) => add(a.label, theme.alpha, null, true, k > 0));
  const val = data.column("val_loss");
  if (val && d.allIdx.some((i) => val[i] !== null)) add("val loss", theme.val, null, true);
  // The latest stop advice, readable without hovering: where it fired and the best step it names.
  const stop = d.stops[d.stops.length - 1];
  if (stop) {
    add(`stop? ${formatNumber(stop.step)}` + (stop.bestStep !== null ? ` · best ${formatNumber(stop.bestStep)}` : ""),
      theme.stop, null, true, true);
  }
  for (const stat of STAT_SERIES) {
    if (data.column(stat.key)) add(stat.label, theme.stats[stat.key], stat.key, !!state.toggles[stat.key]);
  }
  let x = left;
  let row = 0;
  for (const it of items) {
    if (x > left && x + it.w - 4 > right) {
      row++;
      x = left;
    }
    it.x = x;
    it.y = 10 + row * LEGEND_ROW_H;
    x += it.w;
  }
  return { items, rows: row + 1, endX: x };
}

function drawLegend(ctx, theme, legend, data, right) {
  ctx.font = theme.font;
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  const boxes = [];
  for (const { label, color, key, on, dashed, w, x, y } of legend.items) {
    if (key) {
      ctx.strokeStyle = on ? color : theme.frame;
      ctx.lineWidth = 1;
      ctx.strokeRect(x + 0.5, y - 7.5, w - 4, 15);
      if (on) withAlpha(ctx, 0.18, () => { ctx.fillStyle = color; ctx.fillRect(x, y - 7, w - 4, 14); });
      boxes.push({ key, x, y: y - 7, w: w - 4, h: 14, on });
    }
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.setLineDash(dashed ? [3, 2] : []);
    ctx.beginPath();
    ctx.moveTo(x + 3, y);
    ctx.lineTo(x + 11, y);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = key && !on ? theme.mutedText : theme.text;
    ctx.fillText(label, x + 14, y);
  }
  if (data.job) {
    const last = legend.items[legend.items.length - 1];
    ctx.fillStyle = theme.mutedText;
    ctx.textAlign = "right";
    if (ctx.measureText(data.job).width < right - legend.endX - 8) ctx.fillText(data.job, right, last ? last.y : 10);
  }
  return boxes;
}

function hoverRows(data, d, mouseX, xOf) {
  if (d.allIdx.length === 0) return null;
  // Nearest step: binary search when steps are sorted, else a scan.
  const step = data.column("step");
  let best = null;
  let bestDist = Infinity;
  const target = d.xMin + ((mouseX - xOf(d.xMin)) / (xOf(d.xMax) - xOf(d.xMin))) * (d.xMax - d.xMin);
  if (step && data.stepsSorted) {
    let lo = 0;
    let hi = data.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((step[mid] ?? -Infinity) < target) lo = mid + 1;
      else hi = mid;
    }
    for (const i of [lo - 1, lo, lo + 1]) {
      if (i >= 0 && i < data.length && step[i] !== null && Math.abs(step[i] - target) < bestDist) {
        best = step[i];
        bestDist = Math.abs(step[i] - target);
      }
    }
  } else {
    for (const i of d.allIdx) {
      const s = d.stepAt(i);
      if (Math.abs(s - target) < bestDist) {
        best = s;
        bestDist = Math.abs(s - target);
      }
    }
  }
  if (best === null) return null;
  const rows = d.allIdx.filter((i) => d.stepAt(i) === best);
  return { step: best, rows };
}

function tooltipLinesFor(data, d, hover) {
  if (!hover) return [];
  const get = (name, i) => (data.column(name) ? data.column(name)[i] : null);
  const first = hover.rows[0];
  const lines = [];
  const phaseName = (i) => {
    const idx = get("phase_idx", i);
    if (idx === null) return null;
    const phase = phaseOf(data.phases, idx, get("expert_idx", i));
    return phase ? String(phase.name) : `phase ${idx + 1}`;
  };
  const multi = d.series.length > 1;
  const firstPhase = multi ? null : phaseName(first);
  lines.push(`step ${formatNumber(hover.step)}` + (firstPhase ? ` · ${firstPhase}` : ""));
  for (const i of hover.rows) {
    const expertPhase = multi ? phaseName(i) : null;
    const prefix = multi ? `${expertKey(get("expert_idx", i))}${expertPhase ? ` · ${expertPhase}` : ""}: ` : "";
    lines.push(`${prefix}loss ${formatNumber(get("loss", i))}  ema ${formatNumber(d.ema[i])}`);
    const alphas = [];
    if (get("conv_alpha", i) !== null) alphas.push(`conv ${formatNumber(get("conv_alpha", i))}`);
    if (get("linear_alpha", i) !== null) alphas.push(`linear ${formatNumber(get("linear_alpha", i))}`);
    if (alphas.length) lines.push(`${prefix}α ${alphas.join("  ")}`);
  }
  const val = hover.rows.map((i) => get("val_loss", i)).find((v) => v !== null);
  if (val !== undefined) lines.push(`val loss ${formatNumber(val)}`);
  const pair = (a, av, b, bv) => {
    const parts = [];
    if (av !== null) parts.push(`${a} ${formatNumber(av)}`);
    if (bv !== null) parts.push(`${b} ${formatNumber(bv)}`);
    if (parts.length) lines.push(parts.join("  "));
  };
  pair("slope", get("loss_slope", first), "R²", get("loss_r2", first));
  pair("CV", get("loss_cv", first), "stability", get("gradient_stability", first));
  pair("grad norm", get("grad_norm", first), "lr", get("lr", first));
  const events = data.events.filter((e) => e && e.step === hover.step).map((e) => e.event);
  if (events.length) lines.push(`event: ${events.join(", ")}`);
  for (const st of d.stops) {
    if (st.step !== hover.step) continue;
    lines.push(`stop? best step ${formatNumber(st.bestStep)} (val loss ${formatNumber(st.bestVal)})` +
      (st.trend ? `, ${st.trend}` : ""));
  }
  return lines;
}

function renderTooltip(ctx, theme, lines, anchorX, anchorY, plot) {
  ctx.font = theme.font;
  const lineH = 14;
  const w = Math.ceil(Math.max(...lines.map((l) => ctx.measureText(l).width))) + 12;
  const h = lines.length * lineH + 8;
  let x = anchorX + 12;
  if (x + w > plot.x + plot.w) x = Math.max(plot.x, anchorX - 12 - w);
  let y = Math.min(Math.max(plot.y, anchorY - h / 2), plot.y + plot.h - h);
  y = Math.max(0, y);
  ctx.fillStyle = theme.tooltipBg;
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = theme.tooltipBorder;
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  ctx.fillStyle = theme.text;
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  lines.forEach((l, k) => ctx.fillText(l, x + 6, y + 5 + k * lineH));
  return { x, y, w, h };
}

/**
 * Draw `data` (a MetricsData) on `canvas`. Returns the layout: plot rectangle, ranges, bands, transition
 * steps and how many points each path used (decimation), plus xOf/yOfLoss for callers that map positions.
 */
export function renderMetrics(canvas, data, opts = {}) {
  const theme = { ...THEME, ...(opts.theme || {}) };
  const dpr = opts.pixelRatio || (typeof window !== "undefined" && window.devicePixelRatio) || 1;
  const cssWidth = opts.width || canvas.clientWidth || canvas.width / dpr;
  const cssHeight = opts.height || canvas.clientHeight || canvas.height / dpr;
  const ctx = setupCanvas(canvas, cssWidth, cssHeight, dpr);
  const state = { toggles: {}, hoverX: null, hoverY: null, ...(opts.state || {}) };
  ctx.save();
  ctx.fillStyle = theme.background;
  ctx.fillRect(0, 0, cssWidth, cssHeight);

  const d = opts.derived || derive(data, opts);
  const layout = { empty: d.allIdx.length === 0, dpr, cssWidth, cssHeight, legend: [], drawn: {}, tooltip: null,
    hoverStep: null };
  if (layout.empty) {
    renderEmpty(ctx, theme, cssWidth, cssHeight, opts.emptyText || EMPTY_TEXT);
    ctx.restore();
    return layout;
  }

  const narrow = cssWidth < 260;
  const plot = { x: narrow ? 34 : 48, y: 0, w: 0, h: 0 };
  const right = d.alphaCols.length ? (narrow ? 24 : 34) : 10;
  const legend = layoutLegend(ctx, theme, d, state, data, plot.x, cssWidth - 6);
  plot.y = 4 + legend.rows * LEGEND_ROW_H;
  plot.w = Math.max(10, cssWidth - plot.x - right);
  plot.h = Math.max(10, cssHeight - plot.y - 20);
  const [xMin, xMax] = [d.xMin, d.xMax];
  const xOf = (s) => plot.x + ((s - xMin) / (xMax - xMin)) * plot.w;
  let [lo, hi] = d.lossRange || [0, 1];
  const pad = (hi - lo) * 0.06;
  lo -= pad;
  hi += pad;
  const yOfLoss = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;
  const alphaTop = d.alphaMax > 0 ? d.alphaMax * 1.15 : 1;
  const yOfAlpha = (v) => plot.y + plot.h - (v / alphaTop) * plot.h;
  Object.assign(layout, { plot, xRange: [xMin, xMax], lossRange: [lo, hi], alphaRange: [0, alphaTop],
    xOf, yOfLoss, yOfAlpha, transitions: d.transitions });

  // Phase bands, then grid and axes.
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.x, plot.y, plot.w, plot.h);
  ctx.clip();
  const laneH = plot.h / d.lanes.length;
  layout.bands = d.bands.map((b) => {
    const x0 = xOf(b.start);
    const x1 = b.end > b.start ? xOf(b.end) : x0 + 2;
    const color = theme.bands[b.colorIndex % theme.bands.length];
    withAlpha(ctx, theme.bandAlpha, () => {
      ctx.fillStyle = color;
      ctx.fillRect(x0, plot.y + b.lane * laneH, x1 - x0, laneH);
    });
    return { name: b.name, alphaText: b.alphaText, index: b.index, start: b.start, end: b.end, lane: b.lane, x0, x1,
      color };
  });
  ctx.strokeStyle = theme.grid;
  ctx.lineWidth = 1;
  const yTicks = niceTicks(lo, hi, Math.max(2, Math.floor(plot.h / 40)));
  const xTicks = niceTicks(xMin, xMax, Math.max(2, Math.floor(plot.w / 80)));
  ctx.beginPath();
  for (const t of yTicks) {
    const y = Math.round(yOfLoss(t)) + 0.5;
    ctx.moveTo(plot.x, y);
    ctx.lineTo(plot.x + plot.w, y);
  }
  ctx.stroke();

  // Statistics on their own normalised axis (each one scaled to its own robust range).
  for (const stat of STAT_SERIES) {
    const col = data.column(stat.key);
    const range = d.statRanges[stat.key];
    if (!state.toggles[stat.key] || !col || !range) continue;
    const [a, b] = range;
    const yOfStat = (v) => plot.y + plot.h - ((Math.min(b, Math.max(a, v)) - a) / (b - a || 1)) * plot.h;
    ctx.strokeStyle = theme.stats[stat.key];
    ctx.lineWidth = 1.25;
    for (const s of d.series) {
      ctx.setLineDash(s.slot ? [4, 3] : []);
      ctx.beginPath();
      layout.drawn[stat.key] = (layout.drawn[stat.key] || 0) + lastPerColumnPath(ctx, s.idx, col, xOf, yOfStat, d.stepAt);
      ctx.stroke();
    }
    ctx.setLineDash([]);
  }

  // Alpha as a step line on the right axis.
  ctx.strokeStyle = theme.alpha;
  ctx.lineWidth = 1.75;
  d.alphaCols.forEach(({ values: col }, k) => {
    for (const s of d.series) {
      ctx.setLineDash(k || s.slot ? [6, 3] : []);
      ctx.beginPath();
      layout.drawn.alpha = (layout.drawn.alpha || 0) + lastPerColumnPath(ctx, s.idx, col, xOf, yOfAlpha, d.stepAt, true);
      ctx.stroke();
    }
  });
  ctx.setLineDash([]);

  // Loss: raw (faint, min/max per pixel column), then smoothed (thick).
  const loss = data.column("loss");
  layout.drawn.raw = 0;
  layout.drawn.ema = 0;
  for (const s of d.series) {
    const color = theme.loss[s.slot % theme.loss.length];
    if (loss) {
      withAlpha(ctx, theme.rawLossAlpha, () => {
        ctx.strokeStyle = color;
        ctx.lineWidth = 1;
        ctx.beginPath();
        layout.drawn.raw += minMaxPath(ctx, s.idx, loss, xOf, yOfLoss, d.stepAt);
        ctx.stroke();
      });
    }
    ctx.strokeStyle = color;
    ctx.lineWidth = 2.25;
    ctx.lineJoin = "round";
    ctx.beginPath();
    layout.drawn.ema += lastPerColumnPath(ctx, s.idx, d.ema, xOf, yOfLoss, d.stepAt);
    ctx.stroke();
  }

  // Validation loss: its own series (a line through the evaluations, a dot on each), over the training loss.
  const val = data.column("val_loss");
  if (val) {
    layout.drawn.val = 0;
    for (const s of d.series) {
      ctx.strokeStyle = theme.val;
      ctx.lineWidth = 1.5;
      ctx.setLineDash(s.slot ? [4, 3] : []);
      ctx.beginPath();
      let started = false;
      for (const i of s.idx) {
        if (val[i] === null) continue;
        const x = xOf(d.stepAt(i));
        const y = yOfLoss(val[i]);
        if (started) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
        started = true;
      }
      ctx.stroke();
      ctx.setLineDash([]);
      for (const i of s.idx) {
        if (val[i] === null) continue;
        ctx.beginPath();
        ctx.arc(xOf(d.stepAt(i)), yOfLoss(val[i]), 3.5, 0, Math.PI * 2);
        ctx.fillStyle = theme.val;
        ctx.fill();
        ctx.strokeStyle = theme.loss[s.slot % theme.loss.length];
        ctx.lineWidth = 1.25;
        ctx.stroke();
        layout.drawn.val++;
      }
    }
  }

  // Transition markers: dashed, snapped to whole device pixels so they stay crisp.
  const markerW = Math.max(1, Math.round(1.5 * dpr));
  ctx.strokeStyle = theme.transition;
  ctx.lineWidth = markerW / dpr;
  ctx.setLineDash([5, 4]);
  layout.markerColumns = [];
  layout.transitionMarks = [];
  const seenColumns = new Set();
  const snap = (step) => {
    const dev = Math.round(xOf(step) * dpr);
    return [dev, (dev + (markerW % 2 ? 0.5 : 0)) / dpr];
  };
  for (const t of d.transitionMarks) {
    const [dev, x] = snap(t.step);
    if (seenColumns.has(`${dev}|${t.lane}`)) continue;
    seenColumns.add(`${dev}|${t.lane}`);
    if (!layout.markerColumns.includes(dev)) layout.markerColumns.push(dev);
    // In its expert's lane only when the phases are per expert (lane -1: the whole height).
    const [y0, y1] = t.lane >= 0 ? [plot.y + t.lane * laneH, plot.y + (t.lane + 1) * laneH] : [plot.y, plot.y + plot.h];
    layout.transitionMarks.push({ step: t.step, lane: t.lane, x, y0, y1 });
    ctx.beginPath();
    ctx.moveTo(x, y0);
    ctx.lineTo(x, y1);
    ctx.stroke();
  }
  ctx.setLineDash([]);

  // Stop advice: a dashed line in its own colour at the step it fired, labelled "stop?", and a star on the
  // best validation loss it names.
  layout.stops = [];
  for (const st of d.stops) {
    const [, x] = snap(st.step);
    ctx.strokeStyle = theme.stop;
    ctx.lineWidth = markerW / dpr;
    ctx.setLineDash([7, 3]);
    ctx.beginPath();
    ctx.moveTo(x, plot.y);
    ctx.lineTo(x, plot.y + plot.h);
    ctx.stroke();
    ctx.setLineDash([]);
    const mark = { step: st.step, bestStep: st.bestStep, bestVal: st.bestVal, x, star: null, label: null };
    if (st.bestStep !== null && st.bestVal !== null) {
      mark.star = { x: xOf(st.bestStep), y: yOfLoss(st.bestVal) };
      drawStar(ctx, mark.star.x, mark.star.y, 9, theme.stop, theme.background);
    }
    ctx.font = theme.font;
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    const text = "stop?";
    const w = ctx.measureText(text).width;
    // Below the phase names, right of the line (left of it at the right edge).
    const lx = x + 4 + w + 4 <= plot.x + plot.w ? x + 4 : x - 4 - w;
    const ly = plot.y + 20;
    withAlpha(ctx, 0.7, () => {
      ctx.fillStyle = theme.background;
      ctx.fillRect(lx - 2, ly - 1, w + 4, 14);
    });
    ctx.fillStyle = theme.stop;
    ctx.fillText(text, lx, ly);
    mark.label = { x: lx - 2, y: ly - 1, w: w + 4, h: 14 };
    layout.stops.push(mark);
  }

  // Phase names at the top of their bands, over a dark plate so curves do not hide them.
  ctx.font = theme.font;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  for (const b of layout.bands) {
    const label = b.alphaText ? `${b.name} · ${b.alphaText}` : b.name;
    const avail = Math.min(b.x1, plot.x + plot.w) - Math.max(b.x0, plot.x) - 6;
    if (avail < 14) continue;
    let text = label;
    while (text.length > 1 && ctx.measureText(text).width > avail) text = text.slice(0, -2) + "…";
    const tx = Math.max(b.x0, plot.x) + 4;
    const ty = plot.y + b.lane * laneH + 3;
    withAlpha(ctx, 0.55, () => {
      ctx.fillStyle = theme.background;
      ctx.fillRect(tx - 2, ty - 1, ctx.measureText(text).width + 4, 14);
    });
    ctx.fillStyle = theme.text;
    ctx.fillText(text, tx, ty);
  }
  ctx.restore(); // end plot clip

  // Frame and tick labels.
  ctx.strokeStyle = theme.frame;
  ctx.lineWidth = 1;
  ctx.strokeRect(Math.round(plot.x) + 0.5, Math.round(plot.y) + 0.5, Math.round(plot.w), Math.round(plot.h));
  ctx.font = theme.font;
  ctx.fillStyle = theme.mutedText;
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (const t of yTicks) ctx.fillText(formatNumber(t), plot.x - 4, yOfLoss(t));
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks) ctx.fillText(formatNumber(t), xOf(t), plot.y + plot.h + 4);
  if (d.alphaCols.length) {
    ctx.fillStyle = theme.alpha;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    for (const t of niceTicks(0, alphaTop, Math.max(2, Math.floor(plot.h / 40)))) {
      ctx.fillText(formatNumber(t), plot.x + plot.w + 4, yOfAlpha(t));
    }
  }

  layout.legend = drawLegend(ctx, theme, legend, data, plot.x + plot.w);
  layout.legendLabels = legend.items.map((it) => it.label);

  // Hover: crosshair at the nearest step and a tooltip with every value there.
  if (state.hoverX !== null && state.hoverX >= plot.x && state.hoverX <= plot.x + plot.w) {
    const hover = hoverRows(data, d, state.hoverX, xOf);
    if (hover) {
      const x = Math.round(xOf(hover.step)) + 0.5;
      ctx.strokeStyle = theme.mutedText;
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(x, plot.y);
      ctx.lineTo(x, plot.y + plot.h);
      ctx.stroke();
      layout.hoverStep = hover.step;
      layout.tooltipLines = tooltipLinesFor(data, d, hover);
      layout.tooltip = renderTooltip(ctx, theme, layout.tooltipLines, x, state.hoverY ?? plot.y + plot.h / 2, plot);
    }
  }
  ctx.restore();
  return layout;
}

/** One-shot drawing of a payload (no interaction). Returns the layout (see renderMetrics). */
export function drawMetrics(canvas, payload, opts = {}) {
  const data = new MetricsData(payload);
  return renderMetrics(canvas, data, opts);
}

// ---------------------------------------------------------------------------------------------------------
// Bounded copy of a payload for storing in a workflow (node properties): keeps the first and last rows,
// rows where the phase changes, validation rows and event rows, then an even stride of the rest.

export function decimatePayload(payload, maxRows = 2000) {
  if (!payload) return null;
  const columns = payload.columns || [];
  const rows = payload.rows || [];
  const round = (v) => (typeof v === "number" && Number.isFinite(v) && !Number.isInteger(v) ? Number(v.toPrecision(6)) : v);
  const out = { ...payload, columns: columns.slice() };
  if (rows.length <= maxRows) {
    out.rows = rows.map((r) => r.map(round));
    return out;
  }
  const col = (name) => columns.indexOf(name);
  const [phaseI, valI, eventI, expertI] = ["phase_idx", "val_loss", "event_code", "expert_idx"].map(col);
  const keep = new Set([0, rows.length - 1]);
  const lastPhase = new Map();
  const important = [];
  rows.forEach((r, i) => {
    const expert = expertI >= 0 ? r[expertI] : null;
    if (phaseI >= 0 && r[phaseI] !== null) {
      if (lastPhase.has(expert) && lastPhase.get(expert) !== r[phaseI]) important.push(i);
      lastPhase.set(expert, r[phaseI]);
    }
    if ((valI >= 0 && r[valI] !== null) || (eventI >= 0 && r[eventI] !== null && r[eventI] !== 0)) important.push(i);
  });
  const importantBudget = Math.floor(maxRows / 2);
  const importantStride = Math.max(1, Math.ceil(important.length / importantBudget));
  for (let k = 0; k < important.length && keep.size < importantBudget; k += importantStride) keep.add(important[k]);
  const left = maxRows - keep.size;
  const stride = rows.length / Math.max(1, left);
  for (let k = 0; k < left; k++) keep.add(Math.min(rows.length - 1, Math.floor(k * stride)));
  out.rows = [...keep].sort((a, b) => a - b).slice(0, maxRows).map((i) => rows[i].map(round));
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Interactive plot: holds the data, redraws at most once per animation frame, hover tooltip, series toggles.

export class MetricsPlot {
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.opts = opts;
    this.data = new MetricsData();
    this.toggles = { ...(opts.toggles || {}) };
    this.hoverX = null;
    this.hoverY = null;
    this.layout = null;
    this._derived = null;
    this._derivedVersion = -1;
    this._frame = null;
    this._size = null;
    this._listeners = [];
    this._listen("pointermove", (e) => this._onPointerMove(e));
    this._listen("pointerleave", () => this._onPointerLeave());
    this._listen("click", (e) => this._onClick(e));
  }

  _listen(type, fn) {
    this.canvas.addEventListener(type, fn);
    this._listeners.push([type, fn]);
  }

  destroy() {
    for (const [type, fn] of this._listeners) this.canvas.removeEventListener(type, fn);
    this._listeners = [];
    if (this._frame !== null) cancelAnimationFrame(this._frame);
    this._frame = null;
  }

  get length() {
    return this.data.length;
  }

  setPayload(payload) {
    this.data.setPayload(payload);
    this.requestDraw();
  }

  clear() {
    this.data.clear();
    this.requestDraw();
  }

  /** Append rows laid out like `columns` (default: the columns already held). Cheap: no redraw until the next frame. */
  appendRows(rows, columns) {
    this.data.append(columns || this.data.columns, rows);
    this.requestDraw();
  }

  /** Apply one live message: {reset, columns, rows, phases, events, job}. */
  update(detail) {
    if (!detail) return;
    if (detail.reset) this.data.clear();
    if (Array.isArray(detail.phases) && detail.phases.length) this.data.phases = detail.phases;
    if (detail.job) this.data.job = detail.job;
    if (Array.isArray(detail.summary)) this.data.summary = detail.summary.map(String);
    if (detail.events) this.data.mergeEvents(detail.events);
    if (detail.rows && detail.rows.length) this.data.append(detail.columns, detail.rows);
    this.data.version++;
    this.requestDraw();
  }

  toPayload(maxRows) {
    const payload = this.data.toPayload();
    return maxRows ? decimatePayload(payload, maxRows) : payload;
  }

  resize(width, height) {
    if (!(width > 0) || !(height > 0)) return;
    this._size = [width, height];
    this.draw();
  }

  setToggle(key, on) {
    this.toggles[key] = !!on;
    this.opts.onToggle?.({ ...this.toggles });
    this.requestDraw();
  }

  requestDraw() {
    if (this._frame !== null) return;
    if (typeof requestAnimationFrame !== "function") {
      this.draw();
      return;
    }
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this.draw();
    });
  }

  draw() {
    if (this._frame !== null) {
      cancelAnimationFrame(this._frame);
      this._frame = null;
    }
    const [width, height] = this._size || [this.canvas.clientWidth, this.canvas.clientHeight];
    if (!(width > 0) || !(height > 0)) return this.layout;
    if (this._derivedVersion !== this.data.version) {
      this._derived = derive(this.data, this.opts);
      this._derivedVersion = this.data.version;
    }
    this.layout = renderMetrics(this.canvas, this.data, {
      ...this.opts,
      pixelRatio: this.opts.pixelRatio || this._pixelRatio(width),
      width,
      height,
      derived: this._derived,
      state: { toggles: this.toggles, hoverX: this.hoverX, hoverY: this.hoverY },
    });
    return this.layout;
  }

  // Device pixels per CSS pixel, times the zoom of any CSS transform around us (the graph canvas zoom), in
  // quarter steps so a small zoom change does not reallocate the canvas; stays sharp when zoomed in.
  _pixelRatio(width) {
    const dpr = (typeof window !== "undefined" && window.devicePixelRatio) || 1;
    const rect = this.canvas.getBoundingClientRect();
    const zoom = rect.width > 0 ? rect.width / width : 1;
    return dpr * Math.min(3, Math.max(1, Math.round(zoom * 4) / 4));
  }

  /** Lines of the tooltip currently shown ([] when not hovering). */
  tooltipLines() {
    return (this.layout && this.layout.tooltip && this.layout.tooltipLines) || [];
  }

  _localPoint(e) {
    // The node widget may sit under a CSS transform (canvas zoom): map client pixels to our CSS pixels.
    const rect = this.canvas.getBoundingClientRect();
    const [width, height] = this._size || [this.canvas.clientWidth, this.canvas.clientHeight];
    return [((e.clientX - rect.left) * width) / (rect.width || 1), ((e.clientY - rect.top) * height) / (rect.height || 1)];
  }

  _onPointerMove(e) {
    [this.hoverX, this.hoverY] = this._localPoint(e);
    this.requestDraw();
  }

  _onPointerLeave() {
    this.hoverX = this.hoverY = null;
    this.requestDraw();
  }

  _onClick(e) {
    if (!this.layout || !this.layout.legend) return;
    const [x, y] = this._localPoint(e);
    const box = this.layout.legend.find((b) => x >= b.x && x <= b.x + b.w && y >= b.y && y <= b.y + b.h);
    if (!box) return;
    e.stopPropagation();
    this.setToggle(box.key, !this.toggles[box.key]);
  }
}
