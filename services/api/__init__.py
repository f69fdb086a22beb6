"""The job API (FastAPI): `uvicorn services.api.app:create_app --factory`.

Resources (OpenAPI at /docs and /openapi.json; errors are {"error": {"code", "message", "field"?}}):
  POST /jobs (202; Idempotency-Key), GET /jobs (?status=&cursor=&limit=), GET /jobs/{id},
  POST /jobs/{id}/cancel (409 if finished), POST /jobs/{id}/resume (409 unless cancelled/failed),
  GET /jobs/{id}/events (JSON page, or SSE with Accept: text/event-stream), /metrics, /checkpoints,
  /evals, /artifacts, /logs, /report, /report/{file}; GET /models/served; GET /healthz, /readyz,
  /metrics (Prometheus). Bearer auth when NCP_API_TOKEN is set; loopback-only without one.
Input limits (services/api/limits.py): bodies over 1 MiB are 413, a NUL byte in the URL is 422;
every status and media type a route returns is in the OpenAPI document (tests/api/test_fuzz.py
fuzzes the live API with schemathesis).
Migrations: `ncp db upgrade` (services/api/migrate.py, services/api/migrations/).
"""
