"""The data worker: a Celery worker consuming the `data` queue (`ncp worker --queues data`).

The stage functions it runs live in services/worker/stages.py; this package is the entry point
an image or a process manager starts: `python -m services.data_worker [--concurrency N]`.
"""
