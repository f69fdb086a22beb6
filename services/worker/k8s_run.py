"""A multi-node training run on Kubernetes, as the follow loop sees it (a `TrainingRun`).

The pods (services/train_worker/k8s.py renders them) mount the checkpoint volume at NCP_HOME, so
they write the same progress file and read the same stop file as a local child: the follow loop
(follow.py) tails and cancels them exactly as it does a process group. What differs is here:
starting may have to wait until the cluster can hold all the pods (the job waits, visibly, with an
event, instead of failing), the run's end is the Job's status, and stopping it is deleting the Job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from services.train_worker import k8s
from services.worker.context import StageError, plain
from shared.jobs.spec import JobSpec
from shared.paths import run_paths
from shared.settings import Settings

log = logging.getLogger(__name__)

LAUNCH_RETRY_SECONDS = 15.0  # how often a run waiting for GPUs asks the cluster again
STATUS_POLL_SECONDS = 2.0  # how often the Job's status is read

EventFn = Callable[[str, str, dict], None]  # (type, message, data)


class KubeRun:
    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        settings: Settings,
        *,
        mode: str,
        config_path: Path,
        on_event: EventFn,
    ) -> None:
        self.job_id, self.spec, self.settings, self.mode = job_id, spec, settings, mode
        self.config_path = config_path
        self.on_event = on_event
        self.run = run_paths(settings.runs_dir, job_id)
        self.state = "new"  # new | waiting | launched | ended
        self._code: int | None = None
        self._last_launch = 0.0
        self._last_status = 0.0
        self._last_reason: str | None = None

    @property
    def log_path(self) -> Path:
        return self.run.logs / f"{self.mode}.log"  # the pods log to the cluster; nothing local

    def start(self) -> None:
        self._launch()

    def _launch(self) -> None:
        self._last_launch = time.monotonic()
        info = k8s.launch_multinode(
            self.job_id, self.spec, self.settings, mode=self.mode, config_path=self.config_path
        )
        status, reason = info.get("status"), str(info.get("reason", ""))
        if status == "unavailable":
            raise StageError("multinode_unavailable", reason)
        if status in ("created", "exists"):
            self.state = "launched"
            self.on_event("multinode_launched", reason, plain(info))
            return
        # "queued": the cluster cannot hold the pods now.
        self.state = "waiting"
        if reason != self._last_reason:
            self.on_event("waiting_for_gpus", reason, plain(info))
            self._last_reason = reason

    def _job_status(self) -> str:
        client = k8s.KubeClient(self.settings)
        try:
            return k8s.multinode_status(client.get_job(k8s.resource_name(self.job_id)))
        finally:
            client.close()

    def exit_code(self) -> int | None:
        now = time.monotonic()
        if self.state == "ended":
            return self._code
        if self.state == "waiting":
            if self.run.stop_file.exists():  # asked to stop before it ever started
                return self._end(0)
            if now - self._last_launch >= LAUNCH_RETRY_SECONDS:
                self._launch()
            return None
        if now - self._last_status < STATUS_POLL_SECONDS:
            return None
        self._last_status = now
        try:
            status = self._job_status()
        except httpx.TransportError as e:  # the API server blinked; the pods run on regardless
            log.warning("job %s: Kubernetes API unreachable (%s); asking again", self.job_id, e)
            return None
        if status == "running":
            return None
        return self._end(0 if status == "succeeded" else 1)

    def _end(self, code: int) -> int:
        self.state, self._code = "ended", code
        return code

    def terminate(self) -> None:
        if self.state == "launched":
            k8s.delete_multinode(self.job_id, self.settings)
        self._end(1)

    def kill(self) -> None:
        self.terminate()

    def cleanup(self) -> None:
        # A Job that ended by itself stays for its logs (ttlSecondsAfterFinished); one whose follow
        # loop ended any other way is deleted, so no pod trains on unsupervised.
        if self.state == "launched":
            k8s.delete_multinode(self.job_id, self.settings)
            self._end(1)
