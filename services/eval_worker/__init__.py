"""The eval worker: a Celery worker consuming the `eval` queue (`ncp worker --queues eval`).

The stage functions it runs live in services/worker/stages.py; this package is the entry point
an image or a process manager starts: `python -m services.eval_worker [--concurrency N]`.
"""
