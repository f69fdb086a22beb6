// Numbers rounded for people (the same rules as services/cli/human.py).

const finite = (x) => typeof x === "number" && Number.isFinite(x);

export const loss = (x) => (finite(x) ? x.toFixed(3) : "–");

export function si(x, unit = "") {
  if (!finite(x)) return "–";
  for (const [div, suffix] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(x) >= div) {
      const v = x / div;
      const digits = Math.abs(v) < 10 ? 2 : Math.abs(v) < 100 ? 1 : 0;
      return `${v.toFixed(digits)}${suffix}${unit}`;
    }
  }
  return Math.abs(x) >= 10 ? `${x.toFixed(0)}${unit}` : `${Number(x.toPrecision(3))}${unit}`;
}

export const percent = (f) => (finite(f) ? `${(100 * f).toFixed(1)}%` : "–");

export function duration(seconds) {
  if (!finite(seconds) || seconds < 0) return "–";
  let s = Math.round(seconds);
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  const two = (n) => String(n).padStart(2, "0");
  if (d) return `${d}d ${two(h)}h`;
  if (h) return `${h}h ${two(m)}m`;
  if (m) return `${m}m ${two(s)}s`;
  return `${s}s`;
}

export function bytes(n) {
  if (!finite(n)) return "–";
  for (const [div, unit] of [[1e12, "TB"], [1e9, "GB"], [1e6, "MB"], [1e3, "kB"]]) {
    if (n >= div) return `${(n / div).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

export const int = (n) => (finite(n) ? Math.round(n).toLocaleString("en-US") : "–");

export function num(x, digits = 4) {
  if (!finite(x)) return "–";
  return Math.abs(x) >= 1e5 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : Number(x.toFixed(digits)).toString();
}

export function ago(iso) {
  if (!iso) return "–";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  return s < 5 ? "just now" : `${duration(s)} ago`;
}

export const time = (iso) => (iso ? new Date(iso).toLocaleTimeString("en-GB") : "–");

export function between(a, b) {
  if (!a) return null;
  return ((b ? Date.parse(b) : Date.now()) - Date.parse(a)) / 1000;
}

export function kernelLine(report) {
  const parts = [];
  const walk = (prefix, obj) => {
    for (const [k, v] of Object.entries(obj)) {
      if (v && typeof v === "object" && !Array.isArray(v)) walk(`${prefix}${k}.`, v);
      else parts.push(`${prefix}${k} ${typeof v === "number" && Math.abs(v) >= 1e6 ? si(v) : v}`);
    }
  };
  walk("", report);
  return parts.join(" · ");
}
