// Shared pieces: html (htm bound to Preact), the router, links, status badges, progress bars.

import { h } from "preact";
import { useEffect, useState } from "preact/hooks";
import htm from "htm";

export const html = htm.bind(h);

export const BASE = "/console";

// --- routing: paths under /console, history API --------------------------------------------
const listeners = new Set();
export function navigate(path, { replace = false } = {}) {
  const url = path.startsWith(BASE) ? path : BASE + path;
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  listeners.forEach((fn) => fn());
  window.scrollTo(0, 0);
}
window.addEventListener("popstate", () => listeners.forEach((fn) => fn()));

export function useRoute() {
  const [, setTick] = useState(0);
  useEffect(() => {
    const fn = () => setTick((t) => t + 1);
    listeners.add(fn);
    return () => listeners.delete(fn);
  }, []);
  const path = location.pathname.startsWith(BASE) ? location.pathname.slice(BASE.length) || "/" : "/";
  return { path, query: new URLSearchParams(location.search) };
}

export function Link({ href, children, ...rest }) {
  const onClick = (e) => {
    if (e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    navigate(href);
  };
  return html`<a href=${BASE + href} onClick=${onClick} ...${rest}>${children}</a>`;
}

// --- small components ------------------------------------------------------------------------
export function StatusBadge({ status }) {
  return html`<span class=${`badge status-${status}`} data-testid="status">${status}</span>`;
}

export function ProgressBar({ percent, label }) {
  const p = Math.max(0, Math.min(100, percent || 0));
  return html`<div class="progress" title=${`${p.toFixed(1)}%`}>
    <div class="progress-fill" style=${`width:${p}%`}></div>
    <span class="progress-label">${label !== undefined ? label : `${p.toFixed(0)}%`}</span>
  </div>`;
}

export function ErrorNote({ error }) {
  if (!error) return null;
  return html`<p class="error-note" role="alert">${error.message || String(error)}</p>`;
}

// Polls `load` every `ms` while `active`; returns [value, error, reload].
export function usePoll(load, ms, deps, active = true) {
  const [state, setState] = useState({ value: null, error: null });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let stop = false;
    let timer = null;
    const ctrl = new AbortController();
    const run = async () => {
      try {
        const value = await load(ctrl.signal);
        if (!stop) setState({ value, error: null });
      } catch (error) {
        if (!stop && error.name !== "AbortError") setState((s) => ({ value: s.value, error }));
      }
      if (!stop && active && ms) timer = setTimeout(run, ms);
    };
    run();
    return () => {
      stop = true;
      ctrl.abort();
      clearTimeout(timer);
    };
  }, [...deps, tick, active]);
  return [state.value, state.error, () => setTick((t) => t + 1)];
}
