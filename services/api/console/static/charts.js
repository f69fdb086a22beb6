// Charts of a job's metric series, drawn with uPlot (canvas; tens of thousands of points stay fast).
// A Series store holds every (stage, name) series as growing step/value arrays: filled from the
// downsampled history (GET /jobs/{id}/metrics?points=N) and then appended to from the live stream.

import { h } from "preact";
import { useEffect, useRef } from "preact/hooks";
import htm from "htm";
import uPlot from "uplot";

const html = htm.bind(h);

export class SeriesStore {
  constructor() {
    this.series = new Map(); // "stage/name" -> {steps: number[], values: number[]}
    this.version = 0;
  }
  get(stage, name) {
    return this.series.get(`${stage}/${name}`) || null;
  }
  stages() {
    return [...new Set([...this.series.keys()].map((k) => k.split("/")[0]))];
  }
  add(stage, name, step, value) {
    const key = `${stage}/${name}`;
    let s = this.series.get(key);
    if (!s) this.series.set(key, (s = { steps: [], values: [] }));
    const n = s.steps.length;
    if (n && step <= s.steps[n - 1]) {
      if (step === s.steps[n - 1]) s.values[n - 1] = value; // a resumed run repeats a step
      else {
        const i = s.steps.findIndex((x) => x >= step);
        if (s.steps[i] === step) s.values[i] = value;
        else s.steps.splice(i, 0, step), s.values.splice(i, 0, value);
      }
    } else {
      s.steps.push(step);
      s.values.push(value);
    }
    this.version++;
  }
  loadHistory(body) {
    for (const [name, points] of Object.entries(body.series || {})) {
      for (const p of points) this.add(p.stage, name, p.step, p.value);
    }
  }
}

// Exponential moving average with TensorBoard's debiasing: the smoothed curve starts at the data.
export function smooth(values, weight) {
  if (!weight) return values;
  const out = new Array(values.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v == null || !Number.isFinite(v)) {
      out[i] = null;
      continue;
    }
    last = last * weight + (1 - weight) * v;
    n++;
    out[i] = last / (1 - Math.pow(weight, n));
  }
  return out;
}

// Steps are whole numbers: ticks at 1, 2, 5, 10, 20, 50, ... apart, never at 1.2.
const STEP_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p)).sort((a, b) => a - b);

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777"];

// One chart: x = steps, ys = [{label, values, color, width, dash, points}], yfmt formats ticks.
export function Chart({ title, steps, ys, yfmt, empty, testid, height = 220 }) {
  const box = useRef(null);
  const plot = useRef(null);
  const labels = ys.map((y) => y.label).join("|");
  const hasData = steps && steps.length > 0;

  useEffect(() => {
    if (!hasData || !box.current) return undefined;
    const opts = {
      width: Math.max(200, box.current.clientWidth),
      height,
      legend: { show: true, live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      axes: [
        { label: "step", labelSize: 18, size: 36, incrs: STEP_INCRS, values: (u, vals) => vals.map((v) => shortNum(v)) },
        { size: 56, values: (u, vals) => vals.map((v) => (yfmt ? yfmt(v) : shortNum(v))) },
      ],
      series: [
        { label: "step", value: (u, v) => (v == null ? "–" : Math.round(v).toLocaleString("en-US")) },
        ...ys.map((y, i) => ({
          label: y.label,
          stroke: y.color || COLORS[i % COLORS.length],
          width: y.width || 1.5,
          dash: y.dash,
          // uPlot's default shows markers only where points are sparse (a run's first steps).
          points: y.points ? { show: true, size: 5 } : { size: 4 },
          spanGaps: true,
          value: (u, v) => (v == null ? "–" : yfmt ? yfmt(v) : shortNum(v)),
        })),
      ],
    };
    plot.current = new uPlot(opts, [steps, ...ys.map((y) => y.values)], box.current);
    const ro = new ResizeObserver(() => {
      if (plot.current && box.current) plot.current.setSize({ width: Math.max(200, box.current.clientWidth), height });
    });
    ro.observe(box.current);
    return () => {
      ro.disconnect();
      plot.current && plot.current.destroy();
      plot.current = null;
    };
  }, [hasData, labels, height]);

  useEffect(() => {
    if (plot.current && hasData) plot.current.setData([steps, ...ys.map((y) => y.values)]);
  });

  return html`<section class="chart card" data-testid=${testid} data-points=${hasData ? steps.length : 0}>
    <h4>${title}</h4>
    ${hasData ? html`<div class="plot" ref=${box}></div>` : html`<p class="muted empty">${empty || "no data yet"}</p>`}
  </section>`;
}

function shortNum(v) {
  if (v == null) return "";
  const a = Math.abs(v);
  if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toFixed(1)}k`;
  if (a >= 100) return `${Math.round(v)}`;
  return `${+v.toPrecision(3)}`;
}
