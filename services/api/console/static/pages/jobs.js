// The jobs list: newest first, status filter, live refresh.

import { useState } from "preact/hooks";
import { api } from "../api.js";
import * as fmt from "../format.js";
import { ErrorNote, html, Link, ProgressBar, StatusBadge, usePoll } from "../ui.js";

const FILTERS = ["all", "queued", "running", "succeeded", "failed", "cancelled"];

export function JobsPage() {
  const [filter, setFilter] = useState("all");
  const [pages, setPages] = useState(1);
  const [data, error] = usePoll(
    async (signal) => {
      let cursor = null;
      const rows = [];
      for (let i = 0; i < pages; i++) {
        const status = filter === "all" ? undefined : filter === "running" ? ["running", "cancelling"] : filter;
        const body = await api("/jobs", { params: { status, limit: 50, cursor }, signal });
        rows.push(...body.data);
        cursor = body.next_cursor;
        if (!cursor) break;
      }
      return { rows, cursor };
    },
    3000,
    [filter, pages],
  );
  const rows = (data && data.rows) || [];
  return html`<div>
    <div class="page-head">
      <h2>Jobs</h2>
      <div class="filters" role="group" aria-label="Filter by status">
        ${FILTERS.map(
          (f) => html`<button class=${`chip ${filter === f ? "on" : ""}`} data-testid=${`filter-${f}`}
            onClick=${() => (setFilter(f), setPages(1))}>${f}</button>`,
        )}
      </div>
      <div class="spacer"></div>
      <${Link} href="/new" class="btn primary">New job</${Link}>
    </div>
    <${ErrorNote} error=${error} />
    <div class="card table-card">
      <table class="jobs" data-testid="jobs-table">
        <thead><tr>
          <th>job</th><th>status</th><th>stage</th><th class="w-progress">progress</th><th class="num">step</th>
          <th class="num">loss</th><th class="num">tok/s</th><th class="num">ETA</th><th>created</th>
        </tr></thead>
        <tbody>
          ${rows.map((j) => html`<${JobRow} job=${j} key=${j.id} />`)}
          ${data && rows.length === 0 && html`<tr><td colspan="9" class="muted">No ${filter === "all" ? "" : filter} jobs. <${Link} href="/new">Start one</${Link}>.</td></tr>`}
        </tbody>
      </table>
      ${data && data.cursor && html`<button class="btn" onClick=${() => setPages(pages + 1)}>Older jobs</button>`}
    </div>
  </div>`;
}

function JobRow({ job }) {
  const p = job.progress || {};
  const running = job.status === "running";
  return html`<tr data-job=${job.id} data-status=${job.status}>
    <td><${Link} href=${`/jobs/${job.id}`} class="job-link"><b>${job.name || job.kind}</b> <span class="mono muted">${job.id.slice(0, 8)}</span></${Link}>
      <div class="muted small">${job.kind}</div></td>
    <td><${StatusBadge} status=${job.status} /></td>
    <td>${job.current_stage || "–"}</td>
    <td><${ProgressBar} percent=${p.percent} /></td>
    <td class="num">${p.step != null ? `${fmt.int(p.step)}${p.total_steps ? ` / ${fmt.int(p.total_steps)}` : ""}` : "–"}</td>
    <td class="num">${fmt.loss(p.loss)}</td>
    <td class="num">${fmt.si(p.tokens_per_sec)}</td>
    <td class="num">${running ? fmt.duration(p.eta_seconds) : "–"}</td>
    <td title=${job.created_at}>${fmt.ago(job.created_at)}</td>
  </tr>`;
}
