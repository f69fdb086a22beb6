// The API from the browser: same origin, bearer token from sessionStorage, JSON errors as
// ApiError (status, code, field, details), and server-sent events read over fetch (EventSource
// cannot send an Authorization header).

const TOKEN_KEY = "ncp.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (t) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_error";
    this.field = err.field || null;
    this.details = err.details || (err.field ? [{ field: err.field, message: err.message }] : []);
  }
}

// Listeners told when the API refuses the token (the app then shows the sign-in page).
const unauthorized = new Set();
export const onUnauthorized = (fn) => (unauthorized.add(fn), () => unauthorized.delete(fn));

function headers(extra = {}) {
  const h = { ...extra };
  const t = token.get();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function check(r) {
  if (r.ok) return r;
  let body = null;
  try {
    body = await r.json();
  } catch (_) {
    body = null;
  }
  const e = new ApiError(r.status, body);
  if (r.status === 401) unauthorized.forEach((fn) => fn(e));
  throw e;
}

export async function api(path, { method = "GET", body, signal, params } = {}) {
  let url = path;
  if (params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v === undefined || v === null) continue;
      for (const item of Array.isArray(v) ? v : [v]) q.append(k, item);
    }
    if ([...q].length) url += (url.includes("?") ? "&" : "?") + q;
  }
  const init = { method, signal, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await check(await fetch(url, init));
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : r.text();
}

export async function apiBlob(path, { signal } = {}) {
  const r = await check(await fetch(path, { headers: headers(), signal }));
  return r.blob();
}

// Server-sent events over fetch: calls onEvent({event, data, id}) for each event until the
// server ends the stream or `signal` aborts. Resolves when the stream ends.
export async function sse(path, { signal, onEvent, method = "GET", body } = {}) {
  const init = { method, signal, headers: headers({ Accept: "text/event-stream" }) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const r = await check(await fetch(path, init));
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let ev = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (line === "") {
        if (ev.data.length || ev.id !== null || ev.event !== "message") {
          onEvent({ event: ev.event, data: ev.data.join("\n"), id: ev.id });
        }
        ev = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (name === "data") ev.data.push(val);
      else if (name === "event") ev.event = val;
      else if (name === "id") ev.id = val;
    }
  }
}

// An OpenAI-style streamed chat completion through the API's /v1 relay: calls onDelta(text) per
// token group and resolves with the finish reason.
export async function streamChat(request, { signal, onDelta }) {
  let finish = null;
  await sse("/v1/chat/completions", {
    method: "POST",
    body: { ...request, stream: true },
    signal,
    onEvent: ({ data }) => {
      if (!data || data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk);
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) onDelta(c.delta.content);
        if (c.finish_reason) finish = c.finish_reason;
      }
    },
  });
  return finish;
}
