// One job: status and controls, stage timeline, live charts (pretraining and SFT apart), events,
// log tail, checkpoints, evaluation table, samples and the report.

import { useEffect, useRef, useState } from "preact/hooks";
import { api, apiBlob, sse } from "../api.js";
import { Chart, SeriesStore, smooth } from "../charts.js";
import * as fmt from "../format.js";
import { ErrorNote, html, ProgressBar, StatusBadge } from "../ui.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// Points per series of the history: min/max pairs of 500 buckets, more than a chart has pixels.
const HISTORY_POINTS = 1000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Follow an SSE endpoint until the server ends it ("end") or the page goes away; reconnects on
// errors, resuming after the last id it got.
async function follow(path, param, after, signal, onEvent) {
  let cursor = after;
  while (!signal.aborted) {
    let ended = false;
    try {
      await sse(`${path}?${param}=${cursor}`, {
        signal,
        onEvent: (ev) => {
          if (ev.event === "end") ended = true;
          else if (ev.event !== "error") {
            if (ev.id) cursor = Number(ev.id);
            onEvent(ev);
          }
        },
      });
    } catch (e) {
      if (signal.aborted) return;
    }
    if (ended) return;
    await sleep(2000);
  }
}

export function JobPage({ id }) {
  const [job, setJob] = useState(null);
  const [error, setError] = useState(null);
  const [events, setEvents] = useState([]);
  const [generation, setGeneration] = useState(0); // bumped by resume: the streams start again
  const [ver, setVer] = useState(0);
  // The panels under the charts load once the charts' history is in: the charts come first.
  const [historyIn, setHistoryIn] = useState(false);
  const store = useRef(new SeriesStore());
  const [smoothing, setSmoothing] = useState(0.9);

  const loadJob = async (signal) => {
    try {
      const j = await api(`/jobs/${id}`, { signal });
      setJob(j);
      setError(null);
      return j;
    } catch (e) {
      if (e.name !== "AbortError") setError(e);
      return null;
    }
  };

  // Job status: on load, on every event, and every 2 s until it has finished.
  useEffect(() => {
    const ctrl = new AbortController();
    let timer;
    const tick = async () => {
      const j = await loadJob(ctrl.signal);
      if (!j || !TERMINAL.has(j.status)) timer = setTimeout(tick, 2000);
    };
    tick();
    return () => (ctrl.abort(), clearTimeout(timer));
  }, [id, generation]);

  // Metrics: the whole run downsampled, then every new row from the live stream.
  useEffect(() => {
    const ctrl = new AbortController();
    let pending = false;
    const redraw = () => {
      if (pending) return;
      pending = true;
      setTimeout(() => ((pending = false), setVer((v) => v + 1)), 200);
    };
    (async () => {
      try {
        const body = await api(`/jobs/${id}/metrics`, { params: { points: HISTORY_POINTS }, signal: ctrl.signal });
        store.current.loadHistory(body);
        setVer((v) => v + 1); // the history at once; live points are batched by redraw()
        setHistoryIn(true);
        await follow(`/jobs/${id}/metrics`, "after_id", body.last_id || 0, ctrl.signal, (ev) => {
          for (const p of JSON.parse(ev.data).points) store.current.add(p.stage, p.name, p.step, p.value);
          redraw();
        });
      } catch (e) {
        if (!ctrl.signal.aborted) setError(e);
        setHistoryIn(true);
      }
    })();
    return () => ctrl.abort();
  }, [id, generation]);

  // Events: live, and each one refreshes the job. A resumed job's stream starts over; events
  // already shown are not shown twice.
  const seen = useRef(new Set());
  useEffect(() => {
    const ctrl = new AbortController();
    follow(`/jobs/${id}/events`, "after", 0, ctrl.signal, (ev) => {
      const e = JSON.parse(ev.data);
      if (seen.current.has(e.seq)) return;
      seen.current.add(e.seq);
      setEvents((list) => [e, ...list].slice(0, 300));
      loadJob(ctrl.signal);
    });
    return () => ctrl.abort();
  }, [id, generation]);

  if (!job) return html`<div>${error ? html`<${ErrorNote} error=${error} />` : html`<p class="muted">Loading job…</p>`}</div>`;
  // A training stage gets its charts once it has started (or has data, e.g. a resumed job's).
  const stages = ["pretrain", "sft"].filter(
    (s) =>
      job.stages.some((st) => st.name === s && st.status !== "pending") || store.current.stages().includes(s),
  );
  return html`<div class="job-page" data-job=${job.id}>
    <${Header} job=${job} onChange=${(j) => setJob(j)} onResume=${() => setGeneration((g) => g + 1)} />
    <${ErrorNote} error=${error} />
    <${Timeline} job=${job} />
    ${stages.map(
      (s) => html`<${StageCharts} key=${s} stage=${s} store=${store.current} ver=${ver}
        smoothing=${smoothing} setSmoothing=${setSmoothing} job=${job} />`,
    )}
    <div class="two-col">
      <${Events} events=${events} />
      ${historyIn && html`<${Logs} job=${job} />`}
    </div>
    ${historyIn &&
    html`<div class="two-col">
        <${Checkpoints} job=${job} events=${events.length} />
        <${Evals} job=${job} />
      </div>
      <${Samples} job=${job} />
      <${Report} job=${job} />`}
  </div>`;
}

function Header({ job, onChange, onResume }) {
  const [confirming, setConfirming] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const p = job.progress || {};
  const canCancel = job.status === "queued" || job.status === "running";
  const canResume = job.status === "cancelled" || job.status === "failed";
  const act = async (what) => {
    setBusy(true);
    setError(null);
    try {
      onChange(await api(`/jobs/${job.id}/${what}`, { method: "POST" }));
      if (what === "resume") onResume();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
      setConfirming(false);
    }
  };
  const cancel = () => {
    if (!confirming) {
      setConfirming(true);
      setTimeout(() => setConfirming(false), 5000);
      return;
    }
    act("cancel");
  };
  // Each training stage's kernel report (what runs on the device), part of the job status.
  const reports = job.kernels || {};
  return html`<div class="card job-head">
    <div class="job-title">
      <h2>${job.name || job.kind} <span class="mono muted small">${job.id}</span></h2>
      <${StatusBadge} status=${job.status} />
      ${job.cancel_requested && job.status !== "cancelled" && html`<span class="badge status-cancelling">cancel requested</span>`}
      <div class="spacer"></div>
      ${canCancel &&
      html`<button class=${`btn ${confirming ? "danger" : ""}`} disabled=${busy} onClick=${cancel} data-testid="cancel">
        ${confirming ? "Confirm cancel" : "Cancel job"}</button>`}
      ${canResume &&
      html`<button class="btn" disabled=${busy} onClick=${() => act("resume")} data-testid="resume">Resume</button>`}
    </div>
    <${ErrorNote} error=${error} />
    <div class="job-meta muted small">
      ${job.kind} · ${hardwareLine(job.spec)} · created ${fmt.ago(job.created_at)}
      ${job.started_at && ` · ran ${fmt.duration(fmt.between(job.started_at, job.finished_at))}`}
      ${job.attempts > 1 && ` · attempt ${job.attempts}`}
    </div>
    <div class="stats">
      <div class="stat wide"><label>job</label><${ProgressBar} percent=${p.percent} /></div>
      <div class="stat"><label>stage</label><b>${job.current_stage || "–"}</b></div>
      <div class="stat"><label>step</label><b data-testid="step">${p.step != null ? fmt.int(p.step) : "–"}${p.total_steps ? html`<span class="muted"> / ${fmt.int(p.total_steps)}</span>` : ""}</b></div>
      <div class="stat"><label>loss</label><b>${fmt.loss(p.loss)}</b></div>
      <div class="stat"><label>tokens/s</label><b>${fmt.si(p.tokens_per_sec)}</b></div>
      <div class="stat"><label>MFU</label><b>${fmt.percent(p.mfu)}</b></div>
      <div class="stat"><label>memory</label><b>${fmt.bytes(p.peak_memory)}</b></div>
      <div class="stat"><label>ETA</label><b>${job.status === "running" ? fmt.duration(p.eta_seconds) : "–"}</b></div>
    </div>
    ${Object.entries(reports).map(
      ([st, r]) => html`<p class="kernels" data-testid="kernels"><label>kernels · ${st}</label> ${fmt.kernelLine(r)}</p>`,
    )}
    ${job.error && html`<p class="error-note"><b>${job.error.code}</b>: ${job.error.message}</p>`}
  </div>`;
}

function hardwareLine(spec) {
  const hw = (spec && spec.hardware) || {};
  const m = (spec && spec.model) || {};
  const where = !hw.gpus || hw.device === "cpu" ? "CPU" : `${hw.gpus} GPU${hw.gpus > 1 ? "s" : ""}${hw.nodes > 1 ? ` × ${hw.nodes} nodes` : ""}`;
  return `d${m.depth ?? "?"} on ${where}${hw.device && hw.device !== "auto" && hw.device !== "cpu" ? ` (${hw.device})` : ""}`;
}

function Timeline({ job }) {
  return html`<ol class="timeline card" data-testid="timeline">
    ${job.stages.map((st) => {
      const secs = fmt.between(st.started_at, st.finished_at);
      return html`<li class=${`stage stage-${st.status} ${st.name === job.current_stage ? "current" : ""}`} title=${st.error || st.status}>
        <span class="dot"></span>
        <span class="name">${st.name}</span>
        <span class="muted small">${st.status}${secs != null ? ` · ${fmt.duration(secs)}` : ""}</span>
      </li>`;
    })}
  </ol>`;
}

function StageCharts({ stage, store, smoothing, setSmoothing, job }) {
  const raw = store.get(stage, "raw_loss") || store.get(stage, "loss");
  const bpb = store.get(stage, "val_bpb");
  const lr = store.get(stage, "lr_mult");
  const tps = store.get(stage, "tokens_per_sec");
  const mfu = store.get(stage, "mfu");
  const running = job.current_stage === stage && job.status === "running";
  const title = stage === "pretrain" ? "Pretraining" : "SFT";
  return html`<section class="stage-charts" data-testid=${`charts-${stage}`}>
    <div class="section-head">
      <h3>${title}</h3>
      ${running && html`<span class="live">live</span>`}
      <div class="spacer"></div>
      <label class="smoothing">smoothing
        <input type="range" min="0" max="0.99" step="0.01" value=${smoothing}
          onInput=${(e) => setSmoothing(Number(e.target.value))} />
        <span class="mono">${smoothing.toFixed(2)}</span></label>
    </div>
    <div class="chart-grid">
      <${Chart} title="train loss" testid=${`chart-${stage}-loss`} steps=${raw && raw.steps}
        ys=${raw ? [
          { label: "raw", values: raw.values, color: "#93c5fd", width: 1 },
          { label: `smoothed (${smoothing.toFixed(2)})`, values: smooth(raw.values, smoothing), color: "#1d4ed8", width: 2 },
        ] : []} />
      <${Chart} title="validation bits per byte" testid=${`chart-${stage}-bpb`} steps=${bpb && bpb.steps}
        ys=${bpb ? [{ label: "val bpb", values: bpb.values, color: "#dc2626", points: true }] : []}
        empty="no validation yet" />
      <${Chart} title="learning-rate multiplier" testid=${`chart-${stage}-lr`} steps=${lr && lr.steps}
        ys=${lr ? [{ label: "lr mult", values: lr.values, color: "#059669" }] : []} />
      <${Chart} title="tokens / s" testid=${`chart-${stage}-tps`} steps=${tps && tps.steps}
        ys=${tps ? [{ label: "tok/s", values: tps.values, color: "#d97706" }] : []} yfmt=${fmt.si} />
      <${Chart} title="MFU" testid=${`chart-${stage}-mfu`} steps=${mfu && mfu.steps}
        ys=${mfu ? [{ label: "MFU", values: mfu.values.map((v) => 100 * v), color: "#7c3aed" }] : []}
        yfmt=${(v) => `${v.toFixed(1)}%`} empty="no MFU: this device has no known peak FLOPs (CPU)" />
    </div>
  </section>`;
}

function Events({ events }) {
  return html`<section class="card events" data-testid="events">
    <h3>Events</h3>
    <ul class="event-list">
      ${events.map(
        (e) => html`<li key=${e.seq} class=${`ev-${e.type}`}>
          <span class="mono muted">${fmt.time(e.ts)}</span>
          ${e.stage && html`<span class="tag">${e.stage}</span>`}
          <span>${e.message}</span>
        </li>`,
      )}
      ${events.length === 0 && html`<li class="muted">no events yet</li>`}
    </ul>
  </section>`;
}

const MAX_LOG_LINES = 400;

function Logs({ job }) {
  const [files, setFiles] = useState([]);
  const [file, setFile] = useState(null);
  const [lines, setLines] = useState([]);
  const pre = useRef(null);
  const terminal = TERMINAL.has(job.status);
  // The log files: listed again every 5 s while the job runs (a stage creates its log as it starts);
  // the current stage's log is shown unless the user picked another.
  const [picked, setPicked] = useState(false);
  useEffect(() => {
    const ctrl = new AbortController();
    let timer;
    const list = async () => {
      try {
        const body = await api(`/jobs/${job.id}/logs`, { params: { lines: 1 }, signal: ctrl.signal });
        const names = Object.keys(body.logs).sort();
        setFiles(names);
        const current = `${job.current_stage}.log`;
        if (names.length && !picked) setFile(names.includes(current) ? current : (f) => f || names[names.length - 1]);
      } catch (e) {
        if (ctrl.signal.aborted) return;
      }
      if (!terminal) timer = setTimeout(list, 5000);
    };
    list();
    return () => (ctrl.abort(), clearTimeout(timer));
  }, [job.id, job.current_stage, terminal, picked]);
  useEffect(() => {
    if (!file) return undefined;
    const ctrl = new AbortController();
    let offset = null;
    let timer;
    setLines([]);
    const tick = async () => {
      try {
        const chunk = await api(`/jobs/${job.id}/logs/${file}`, { params: { offset }, signal: ctrl.signal });
        offset = chunk.next_offset;
        if (chunk.text) {
          setLines((old) => old.concat(chunk.text.replace(/\n$/, "").split("\n")).slice(-MAX_LOG_LINES));
        }
      } catch (e) {
        if (ctrl.signal.aborted) return;
      }
      if (!terminal) timer = setTimeout(tick, 2000);
    };
    tick();
    return () => (ctrl.abort(), clearTimeout(timer));
  }, [job.id, file, terminal]);
  useEffect(() => {
    if (pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [lines]);
  return html`<section class="card logs" data-testid="logs">
    <div class="section-head">
      <h3>Log</h3>
      <div class="spacer"></div>
      ${files.map(
        (f) => html`<button class=${`chip ${f === file ? "on" : ""}`} onClick=${() => (setPicked(true), setFile(f))}>${f}</button>`,
      )}
    </div>
    <pre ref=${pre} class="log-tail">${lines.length ? lines.join("\n") : files.length ? "" : "no log files yet"}</pre>
  </section>`;
}

// Reloads `load` whenever `key` changes (a stage finished, a checkpoint event arrived).
function useLoad(load, key) {
  const [value, setValue] = useState(null);
  useEffect(() => {
    const ctrl = new AbortController();
    load(ctrl.signal).then(setValue, () => {});
    return () => ctrl.abort();
  }, [key]);
  return value;
}

const stagesKey = (job) => `${job.id}:${job.status}:${job.stages.map((s) => s.status).join(",")}`;

function Checkpoints({ job, events }) {
  const body = useLoad((signal) => api(`/jobs/${job.id}/checkpoints`, { signal }), `${stagesKey(job)}:${events}`);
  const rows = (body && body.data) || [];
  return html`<section class="card" data-testid="checkpoints">
    <h3>Checkpoints</h3>
    ${rows.length
      ? html`<table><thead><tr><th>kind</th><th class="num">step</th><th class="num">val bpb</th><th>saved</th><th>path</th></tr></thead>
        <tbody>${rows.map(
          (c) => html`<tr><td>${c.kind}</td><td class="num">${fmt.int(c.step)}</td><td class="num">${fmt.num(c.val_bpb)}</td>
            <td>${fmt.ago(c.created_at)}</td><td class="mono small path">${c.path}</td></tr>`,
        )}</tbody></table>`
      : html`<p class="muted">no checkpoints yet</p>`}
  </section>`;
}

// Eval results arrive flattened ("core/results/<task>", "tasks/<task>/accuracy", ...): one row per
// task with accuracy, centred and problems; the stage's own numbers (val bpb, CORE, ChatCORE) on top.
const TASK_PATTERNS = [
  [/^core\/(results|centered|num_items)\/(.+)$/, (m) => [m[2], { results: "accuracy", centered: "centered", num_items: "n" }[m[1]]]],
  [/^tasks\/(.+)\/(accuracy|centered|n)$/, (m) => [m[1], m[2]]],
];
const HEADLINE = { val_bpb: "val bpb", "core/core": "CORE", chatcore: "ChatCORE", seconds: "eval seconds" };

export function pivotEvals(rows) {
  const tasks = new Map();
  const headline = [];
  for (const r of rows) {
    const hit = TASK_PATTERNS.map(([re, f]) => [r.task.match(re), f]).find(([m]) => m);
    if (!hit) {
      headline.push({ stage: r.stage, label: HEADLINE[r.task] || r.task, value: r.value, step: r.checkpoint_step });
      continue;
    }
    const [name, col] = hit[1](hit[0]);
    const key = `${r.stage}/${name}`;
    if (!tasks.has(key)) tasks.set(key, { stage: r.stage, name });
    tasks.get(key)[col] = r.value;
  }
  const order = Object.values(HEADLINE);
  const rank = (h) => (order.includes(h.label) ? order.indexOf(h.label) : order.length);
  headline.sort((a, b) => rank(a) - rank(b) || a.stage.localeCompare(b.stage));
  return { headline, tasks: [...tasks.values()] };
}

function Evals({ job }) {
  const body = useLoad((signal) => api(`/jobs/${job.id}/evals`, { signal }), stagesKey(job));
  const { headline, tasks } = pivotEvals((body && body.data) || []);
  return html`<section class="card" data-testid="evals">
    <h3>Evaluation</h3>
    ${headline.length === 0 && tasks.length === 0 && html`<p class="muted">no evaluation results yet</p>`}
    ${headline.length > 0 &&
    html`<div class="stats eval-head">${headline.map(
      (h) => html`<div class="stat"><label>${h.stage} · ${h.label}</label><b>${fmt.num(h.value)}</b></div>`,
    )}</div>`}
    ${tasks.length > 0 &&
    html`<table><thead><tr><th>stage</th><th>task</th><th class="num">accuracy</th><th class="num">centred</th><th class="num">problems</th></tr></thead>
      <tbody>${tasks.map(
        (t) => html`<tr><td>${t.stage}</td><td>${t.name}</td><td class="num">${fmt.num(t.accuracy)}</td>
          <td class="num">${fmt.num(t.centered)}</td><td class="num">${fmt.int(t.n)}</td></tr>`,
      )}</tbody></table>`}
  </section>`;
}

function Samples({ job }) {
  const body = useLoad((signal) => api(`/jobs/${job.id}/samples`, { signal }), stagesKey(job));
  if (!body || (!body.base.length && !body.chat.length)) return null;
  const list = (title, samples, step) =>
    samples.length
      ? html`<div><h4>${title} <span class="muted small">step ${step}</span></h4>
          ${samples.map((s) => html`<div class="sample"><p class="prompt">${s.prompt}</p><pre>${s.completion}</pre></div>`)}</div>`
      : null;
  return html`<section class="card samples" data-testid="samples">
    <h3>Samples</h3>
    <div class="two-col">${list("Base model", body.base, body.base_step)} ${list("Chat model", body.chat, body.chat_step)}</div>
  </section>`;
}

function Report({ job }) {
  const box = useRef(null);
  const reportDone = job.stages.some((s) => s.name === "report" && s.status === "succeeded");
  const body = useLoad(
    (signal) => (reportDone ? api(`/jobs/${job.id}/report.html`, { signal }) : Promise.resolve(null)),
    `${job.id}:${reportDone}`,
  );
  useEffect(() => {
    if (!box.current || !body) return undefined;
    // Report images need the bearer token: fetch them and show them as blob URLs.
    const urls = [];
    for (const img of box.current.querySelectorAll("img")) {
      const name = img.getAttribute("src");
      if (!name || name.includes("/") || name.startsWith("blob:")) continue;
      img.removeAttribute("src");
      apiBlob(`/jobs/${job.id}/report/${encodeURIComponent(name)}`).then((blob) => {
        const url = URL.createObjectURL(blob);
        urls.push(url);
        img.src = url;
      }, () => {});
    }
    return () => urls.forEach((u) => URL.revokeObjectURL(u));
  }, [body]);
  if (!body) return null;
  return html`<section class="card report" data-testid="report">
    <div class="report-body" ref=${box} dangerouslySetInnerHTML=${{ __html: body }}></div>
  </section>`;
}
