// Chat with the served model: streamed answers through the API's OpenAI-compatible relay (/v1),
// a system prompt, temperature and top-k, a new-conversation button, and which model answers.

import { useEffect, useRef, useState } from "preact/hooks";
import { api, streamChat } from "../api.js";
import { ErrorNote, html } from "../ui.js";

const FINISH = { length: "stopped at max tokens", stopped: "stopped", error: "failed" };

export function ChatPage() {
  const [models, setModels] = useState(null);
  const [served, setServed] = useState(null);
  const [model, setModel] = useState("");
  const [system, setSystem] = useState("");
  const [temperature, setTemperature] = useState(0.6);
  const [topK, setTopK] = useState(50);
  const [maxTokens, setMaxTokens] = useState(256);
  const [messages, setMessages] = useState([]);
  const [input, setInput] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const abort = useRef(null);
  const log = useRef(null);

  const loadModels = async () => {
    try {
      const [list, pointer] = await Promise.all([api("/v1/models"), api("/models/served")]);
      setModels(list.data || []);
      setServed(pointer.current);
      if (list.data && list.data.length && !model) setModel(list.data[0].id);
      setError(null);
    } catch (e) {
      setModels([]);
      setError(e);
    }
  };
  useEffect(() => {
    loadModels();
  }, []);
  useEffect(() => {
    if (log.current) log.current.scrollTop = log.current.scrollHeight;
  }, [messages]);

  const send = async (e) => {
    e.preventDefault();
    const text = input.trim();
    if (!text || busy || !model) return;
    const history = [...messages, { role: "user", content: text }];
    setMessages([...history, { role: "assistant", content: "", streaming: true }]);
    setInput("");
    setBusy(true);
    setError(null);
    const ctrl = new AbortController();
    abort.current = ctrl;
    let answer = "";
    try {
      const request = {
        model,
        messages: [...(system.trim() ? [{ role: "system", content: system.trim() }] : []), ...history.map(({ role, content }) => ({ role, content }))],
        temperature: Number(temperature),
        max_tokens: Number(maxTokens),
      };
      if (Number(topK) > 0) request.top_k = Number(topK);
      const finish = await streamChat(request, {
        signal: ctrl.signal,
        onDelta: (d) => {
          answer += d;
          setMessages([...history, { role: "assistant", content: answer, streaming: true }]);
        },
      });
      setMessages([...history, { role: "assistant", content: answer, finish }]);
    } catch (err) {
      setMessages([...history, { role: "assistant", content: answer, finish: ctrl.signal.aborted ? "stopped" : "error" }]);
      if (!ctrl.signal.aborted) setError(err);
    } finally {
      setBusy(false);
      abort.current = null;
    }
  };

  const reset = () => {
    if (abort.current) abort.current.abort();
    setMessages([]);
    setError(null);
  };

  return html`<div class="chat-page">
    <div class="page-head">
      <h2>Chat</h2>
      <span class="muted" data-testid="served-model">
        ${models === null ? "…" : models.length ? html`model <b>${model}</b>${served && served.path ? html` <span class="small">(${served.path})</span>` : ""}` : "no model is served"}
      </span>
      <div class="spacer"></div>
      <button class="btn" onClick=${reset} data-testid="new-conversation">New conversation</button>
    </div>
    <${ErrorNote} error=${error} />
    <div class="two-col wide-left">
      <section class="card chat">
        <div class="messages" ref=${log} data-testid="messages">
          ${messages.length === 0 && html`<p class="muted">Ask the model something. Answers stream in as they are generated.</p>`}
          ${messages.map(
            (m) => html`<div class=${`msg ${m.role} ${m.streaming ? "streaming" : ""}`} data-role=${m.role}>
              <div class="who">${m.role === "user" ? "you" : model}</div>
              <div class="text">${m.content}${m.streaming ? html`<span class="caret">▍</span>` : ""}</div>
              ${m.finish && m.finish !== "stop" && html`<div class="muted small">(${FINISH[m.finish] || m.finish})</div>`}
            </div>`,
          )}
        </div>
        <form class="composer" onSubmit=${send}>
          <textarea name="prompt" rows="2" value=${input} placeholder="Message" disabled=${!model}
            onInput=${(e) => setInput(e.target.value)}
            onKeyDown=${(e) => {
              if (e.key === "Enter" && !e.shiftKey) send(e);
            }}></textarea>
          ${busy
            ? html`<button class="btn" type="button" onClick=${() => abort.current && abort.current.abort()}>Stop</button>`
            : html`<button class="btn primary" type="submit" disabled=${!model} data-testid="send">Send</button>`}
        </form>
      </section>
      <aside class="card settings">
        <h3>Settings</h3>
        <label>model
          <select value=${model} onChange=${(e) => setModel(e.target.value)}>
            ${(models || []).map((m) => html`<option value=${m.id}>${m.id}</option>`)}
          </select></label>
        <label>system prompt
          <textarea name="system" rows="4" value=${system} onInput=${(e) => setSystem(e.target.value)}
            placeholder="optional"></textarea></label>
        <label>temperature <span class="mono">${Number(temperature).toFixed(2)}</span>
          <input name="temperature" type="range" min="0" max="2" step="0.05" value=${temperature}
            onInput=${(e) => setTemperature(e.target.value)} /></label>
        <label>top-k <input name="top_k" type="number" min="0" value=${topK} onInput=${(e) => setTopK(e.target.value)} />
          <span class="muted small">0 = off</span></label>
        <label>max tokens <input name="max_tokens" type="number" min="1" value=${maxTokens}
          onInput=${(e) => setMaxTokens(e.target.value)} /></label>
        <button class="btn" type="button" onClick=${loadModels}>Refresh models</button>
      </aside>
    </div>
  </div>`;
}
