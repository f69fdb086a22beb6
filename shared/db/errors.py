"""Registry refusals; the API maps each to an HTTP status (404, 409)."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of registry refusals (the API maps each to an HTTP status)."""


class JobNotFound(RegistryError, LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class IllegalTransition(RegistryError):
    def __init__(self, job_id: str, current: str, wanted: str, why: str = ""):
        msg = f"job {job_id} is {current}; cannot go to {wanted}"
        super().__init__(f"{msg}: {why}" if why else msg)
        self.job_id, self.current, self.wanted = job_id, current, wanted


class IdempotencyConflict(RegistryError):
    """The idempotency key was already used for a job with a different spec."""
