// The new-job form: kind, preset, depth, FP8, data source, horizon, GPUs. The plan (parameters, FLOPs,
// iterations, estimated time on the chosen GPU) is asked of the server (POST /plan) as the form
// changes, before anything is submitted; the server's 422s appear beside the field they name.

import { useEffect, useMemo, useState } from "preact/hooks";
import { api, ApiError } from "../api.js";
import * as fmt from "../format.js";
import { html, navigate } from "../ui.js";

const HORIZONS = {
  auto: "auto (12 tokens per parameter)",
  num_iterations: "iterations",
  target_param_data_ratio: "tokens per parameter",
  target_flops: "total FLOPs",
};

const clone = (x) => JSON.parse(JSON.stringify(x));

// The form's fields from a spec (a preset or the defaults).
function fieldsOf(spec) {
  const hz = spec.horizon || {};
  const mode = Object.keys(HORIZONS).find((k) => k !== "auto" && hz[k] != null) || "auto";
  const data = spec.data || {};
  const hw = spec.hardware || {};
  return {
    kind: spec.kind || "pipeline",
    name: spec.name || "",
    depth: String((spec.model || {}).depth ?? 20),
    fp8: (spec.model || {}).fp8 === true,
    source: data.source || "demo",
    path: data.path || "",
    repo: data.repo || "",
    horizon: mode,
    horizonValue: mode === "auto" ? "" : String(hz[mode]),
    gpus: String(hw.gpus ?? 1),
    device: hw.device || "auto",
  };
}

// The spec to plan and submit: the preset (if any) with the form's fields on top.
export function buildSpec(base, f) {
  const spec = clone(base || {});
  const number = (s) => (s === "" || s == null ? s : Number(s));
  spec.kind = f.kind;
  if (f.name.trim()) spec.name = f.name.trim();
  else delete spec.name;
  if (f.kind !== (base || {}).kind) delete spec.stages; // the kind's default stages
  // fp8 is always sent, like depth: what the box shows is what runs (pretraining only).
  spec.model = { ...(spec.model || {}), depth: number(f.depth), fp8: f.fp8 };
  const data = { ...(spec.data || {}), source: f.source };
  delete data.path;
  delete data.repo;
  delete data.base_url;
  if (f.source === "local") data.path = f.path;
  if (f.source === "remote") data.repo = f.repo;
  spec.data = data;
  spec.horizon = f.horizon === "auto" ? {} : { [f.horizon]: number(f.horizonValue) };
  spec.hardware = { ...(spec.hardware || {}), gpus: number(f.gpus), device: f.device };
  return spec;
}

function errorsByField(err) {
  if (!(err instanceof ApiError)) return { _: err ? err.message : null };
  const out = {};
  for (const d of err.details.length ? err.details : [{ field: err.field, message: err.message }]) {
    const key = d.field || "_";
    if (!out[key]) out[key] = d.message;
  }
  return out;
}

const FORM_FIELDS = ["kind", "name", "model.depth", "model.fp8", "data.source", "data.path", "data.repo", "horizon", "hardware.gpus", "hardware.device", "gpu"];

function placeFor(field) {
  // A nested field the form does not show (e.g. model.vocab_size) is reported at the top.
  if (!field) return "_";
  if (field.startsWith("horizon")) return "horizon";
  if (FORM_FIELDS.includes(field)) return field;
  const top = field.split(".")[0];
  return FORM_FIELDS.includes(top) ? top : "_";
}

function FieldError({ errors, name }) {
  const msg = errors[name];
  return msg ? html`<p class="field-error" role="alert" data-field=${name}>${msg}</p>` : null;
}

export function NewJobPage() {
  const [presets, setPresets] = useState(null);
  const [gpus, setGpus] = useState(null);
  const [preset, setPreset] = useState("demo");
  const [f, setF] = useState(null);
  const [gpu, setGpu] = useState("h100");
  const [plan, setPlan] = useState(null);
  const [errors, setErrors] = useState({});
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    Promise.all([api("/plan/presets"), api("/plan/gpus")]).then(
      ([p, g]) => {
        setPresets(p);
        setGpus(g);
        setGpu(g.default);
        setF(fieldsOf(p.demo || {}));
      },
      (e) => setErrors({ _: e.message }),
    );
  }, []);

  const base = preset === "none" || !presets ? {} : presets[preset];
  const spec = useMemo(() => (f ? buildSpec(base, f) : null), [f, preset, presets]);

  // Ask for the plan whenever the spec or the GPU changes (debounced).
  useEffect(() => {
    if (!spec) return undefined;
    const ctrl = new AbortController();
    const t = setTimeout(async () => {
      try {
        setPlan(await api("/plan", { method: "POST", params: { gpu }, body: spec, signal: ctrl.signal }));
        setErrors({});
      } catch (e) {
        if (e.name === "AbortError") return;
        setPlan(null);
        setErrors(remap(errorsByField(e)));
      }
    }, 300);
    return () => (ctrl.abort(), clearTimeout(t));
  }, [spec, gpu]);

  const set = (k) => (e) => setF({ ...f, [k]: e.target.value });
  const choosePreset = (e) => {
    const name = e.target.value;
    setPreset(name);
    setF(fieldsOf(name === "none" ? {} : presets[name]));
  };

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    try {
      const job = await api("/jobs", { method: "POST", body: spec });
      navigate(`/jobs/${job.id}`);
    } catch (err) {
      setErrors(remap(errorsByField(err)));
    } finally {
      setBusy(false);
    }
  };

  if (!f) return html`<div class="card"><p class="muted">Loading…</p>${errors._ && html`<p class="error-note">${errors._}</p>`}</div>`;
  return html`<div class="new-job">
    <div class="page-head"><h2>New job</h2></div>
    <div class="two-col wide-left">
      <form class="card form" onSubmit=${submit} data-testid="new-job-form" novalidate>
        ${errors._ && html`<p class="error-note" role="alert" data-field="_">${errors._}</p>`}
        <div class="row">
          <label>preset
            <select name="preset" value=${preset} onChange=${choosePreset}>
              ${Object.keys(presets).map((p) => html`<option value=${p}>${p}</option>`)}
              <option value="none">none (platform defaults)</option>
            </select></label>
          <label>kind
            <select name="kind" value=${f.kind} onChange=${set("kind")}>
              ${["pipeline", "pretrain", "sft", "eval"].map((k) => html`<option value=${k}>${k}</option>`)}
            </select><${FieldError} errors=${errors} name="kind" /></label>
          <label>name <input name="name" value=${f.name} onInput=${set("name")} placeholder="optional label" />
            <${FieldError} errors=${errors} name="name" /></label>
        </div>
        <div class="row">
          <label>depth (layers)
            <input name="depth" type="number" value=${f.depth} onInput=${set("depth")} />
            <${FieldError} errors=${errors} name="model.depth" /></label>
          <label class="check" title="Pretraining matmuls in FP8 (needs an FP8 GPU); SFT and evaluation stay bf16">
            <input name="fp8" type="checkbox" checked=${f.fp8} onChange=${(e) => setF({ ...f, fp8: e.target.checked })} />
            FP8 pretraining
            <${FieldError} errors=${errors} name="model.fp8" /></label>
          <label>data source
            <select name="source" value=${f.source} onChange=${set("source")}>
              <option value="demo">demo (offline, generated)</option>
              <option value="local">local files</option>
              <option value="remote">remote shards</option>
            </select><${FieldError} errors=${errors} name="data.source" /></label>
          ${f.source === "local" &&
          html`<label>corpus path <input name="path" value=${f.path} onInput=${set("path")} placeholder="under NCP_HOME or a data root" />
            <${FieldError} errors=${errors} name="data.path" /></label>`}
          ${f.source === "remote" &&
          html`<label>dataset repo <input name="repo" value=${f.repo} onInput=${set("repo")} placeholder="owner/name" />
            <${FieldError} errors=${errors} name="data.repo" /></label>`}
        </div>
        <div class="row">
          <label>horizon
            <select name="horizon" value=${f.horizon} onChange=${set("horizon")}>
              ${Object.entries(HORIZONS).map(([k, v]) => html`<option value=${k}>${v}</option>`)}
            </select></label>
          ${f.horizon !== "auto" &&
          html`<label>${HORIZONS[f.horizon]}
            <input name="horizonValue" type="number" value=${f.horizonValue} onInput=${set("horizonValue")} /></label>`}
          <${FieldError} errors=${errors} name="horizon" />
        </div>
        <div class="row">
          <label>GPUs per node
            <input name="gpus" type="number" value=${f.gpus} onInput=${set("gpus")} />
            <${FieldError} errors=${errors} name="hardware.gpus" /></label>
          <label>device
            <select name="device" value=${f.device} onChange=${set("device")}>
              ${["auto", "cpu", "cuda"].map((d) => html`<option value=${d}>${d}</option>`)}
            </select><${FieldError} errors=${errors} name="hardware.device" /></label>
          <label>estimate on
            <select name="gpu" value=${gpu} onChange=${(e) => setGpu(e.target.value)}>
              ${Object.keys(gpus.peak_flops).filter((g) => g !== "cpu").map((g) => html`<option value=${g}>${g}</option>`)}
            </select><${FieldError} errors=${errors} name="gpu" /></label>
        </div>
        <div class="actions">
          <button class="btn primary" type="submit" disabled=${busy} data-testid="submit">Submit job</button>
          <span class="muted small">${plan ? "the plan on the right is what will run" : ""}</span>
        </div>
        <details><summary>spec (what is submitted)</summary><pre class="spec">${JSON.stringify(spec, null, 2)}</pre></details>
      </form>
      <${PlanPanel} plan=${plan} />
    </div>
  </div>`;
}

function remap(byField) {
  const out = {};
  for (const [field, msg] of Object.entries(byField)) {
    const place = placeFor(field === "_" ? null : field);
    const text = place === "_" && field !== "_" ? `${field}: ${msg}` : msg;
    if (!out[place]) out[place] = text;
  }
  return out;
}

function PlanPanel({ plan }) {
  if (!plan) return html`<aside class="card plan" data-testid="plan"><h3>Plan</h3><p class="muted">Fix the form to see the plan.</p></aside>`;
  if (!plan.trains)
    return html`<aside class="card plan" data-testid="plan"><h3>Plan</h3><p>This ${plan.kind} job does not pretrain: nothing to size.</p></aside>`;
  const row = (k, v, id) => html`<tr><th>${k}</th><td data-testid=${id}>${v}</td></tr>`;
  const mc = (plan.detail || {}).model_config || {};
  return html`<aside class="card plan" data-testid="plan">
    <h3>Plan</h3>
    <table>
      ${row("model", `${mc.n_layer} layers · width ${mc.n_embd} · ${mc.n_head} heads · context ${fmt.int(mc.sequence_len)}`)}
      ${row("parameters", `${fmt.si(plan.params)} (${fmt.int(plan.params)})`, "plan-params")}
      ${row("FLOPs / token", fmt.si(plan.flops_per_token))}
      ${row("total FLOPs", plan.total_flops.toExponential(2), "plan-flops")}
      ${row("iterations", `${fmt.int(plan.num_iterations)} (from ${plan.horizon_from.replaceAll("_", " ")})`, "plan-iterations")}
      ${row("batch", `${fmt.int(plan.total_batch_size)} tokens / step`)}
      ${row("tokens", `${fmt.si(plan.total_tokens)} (${plan.tokens_per_param.toFixed(1)} per parameter)`)}
      ${row("hardware", `${plan.gpus} × ${plan.gpu}`)}
      ${row(
        "estimated time",
        plan.est_seconds != null ? `${fmt.duration(plan.est_seconds)} at ${fmt.percent(plan.mfu)} MFU` : "– (no peak FLOPs for a CPU)",
        "plan-time",
      )}
    </table>
  </aside>`;
}
