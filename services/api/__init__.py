"""The job API (FastAPI): `uvicorn services.api.app:create_app --factory`.

Resources (OpenAPI at /docs and /openapi.json; errors are {"error": {"code", "message", "field"?}}):
  POST /jobs (202; Idempotency-Key), GET /jobs (?status=&cursor=&limit=), GET /jobs/{id},
  POST /jobs/{id}/cancel (409 if finished), POST /jobs/{id}/resume (409 unless cancelled/failed),
  GET /jobs/{id}/events (JSON page, or SSE with Accept: text/event-stream), /metrics, /checkpoints,
  /evals, /artifacts, /logs, /report, /report/{file}; GET /models/served; GET /healthz, /readyz,
  /metrics (Prometheus). Bearer auth when NCP_API_TOKEN is set; loopback-only without one.
Migrations: `ncp db upgrade` (services/api/migrate.py, services/api/migrations/).
"""
