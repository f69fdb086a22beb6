"""Train worker: the Celery side lives in services/worker; `entry` is the torchrun child it launches."""
