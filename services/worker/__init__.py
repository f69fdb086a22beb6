"""Celery side of the platform: the app, stage tasks, the training launcher and the reconciler."""
