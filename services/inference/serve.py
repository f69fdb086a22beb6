"""Serving supervisor: run the model server for the published model and keep it running.

`python -m services.inference.serve [--engine auto|vllm|native] [--port P] [--model DIR --name N]`

Reads `$NCP_HOME/serving/current.json` ({"model": name, "path": export_dir}), starts vLLM (with
our plugin) or the native server as a child process on Settings.inference_port, restarts it when
current.json changes (the pipeline published a new model) and when it crashes. Restarts back off
exponentially (2 s doubling, capped); an engine that exits before its /health ever answered
`max_start_failures` times in a row puts the supervisor in state "failed" with the reason in
`serving/served.json` (served_state.py), which `/models/served` reads.
/health and /v1/* are answered by the child. While no child runs (no model published yet, or an
engine restarting), services/inference/waiting.py answers instead: /health says "no model yet"
(healthy) or 503 (with the failure, once there is one), everything else 503. With --model it
serves that folder and ignores current.json.

vLLM on a CPU-only host reserves `--gpu-memory-utilization` x all RAM and refuses to start when
less is free, so its GPU default (0.9) fails on any machine doing something else. Unless a share
is configured, the CPU default is an explicit KV-cache size instead (`cpu_kv_cache_bytes`).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.inference.publish import CURRENT_FILE, read_current
from services.inference.served_state import write_state
from services.inference.waiting import WaitingServer
from shared.loopback import is_loopback
from shared.nanochat.export import check_export
from shared.parent_death import die_with_parent

log = logging.getLogger("ncp.serve")
ENGINES = ("auto", "vllm", "native")
GiB = 1 << 30


def cpu_kv_cache_bytes(available_bytes: int) -> int:
    """vLLM's KV cache on a CPU host: a quarter of the RAM free now, between 512 MiB and 2 GiB
    (~14K tokens of a d24 model in bf16; a share of *all* RAM fails on a busy machine)."""
    return int(min(2 * GiB, max(GiB // 2, available_bytes // 4)))


@dataclass(frozen=True)
class ServeConfig:
    engine: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8001
    vllm_python: str = sys.executable
    gpu_memory_utilization: float | None = None  # None: vLLM's default on a GPU, see module doc on CPU
    max_model_len: int | None = None
    dtype: str = "auto"
    vllm_extra_args: tuple[str, ...] = ()
    poll_seconds: float = 1.0
    first_backoff_seconds: float = 2.0
    max_backoff_seconds: float = 300.0
    max_start_failures: int = 3  # consecutive exits before /health answered -> state "failed"
    api_key: str | None = field(default=None, repr=False)  # Settings.inference_api_key

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {self.poll_seconds}")
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without NCP_INFERENCE_API_KEY (or bind to 127.0.0.1)"
            )
        if not 0 < self.first_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError(
                f"first_backoff_seconds must be in (0, max_backoff_seconds={self.max_backoff_seconds}], "
                f"got {self.first_backoff_seconds}"
            )
        if self.max_start_failures < 1:
            raise ValueError(f"max_start_failures must be >= 1, got {self.max_start_failures}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_settings(cls, settings, **overrides) -> ServeConfig:
        values = dict(
            engine=settings.inference_engine,
            host=settings.inference_host,
            port=settings.inference_port,
            vllm_python=settings.vllm_python or sys.executable,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.vllm_max_model_len,
            dtype=settings.vllm_dtype,
            vllm_extra_args=tuple(shlex.split(settings.vllm_extra_args)),
            api_key=settings.inference_api_key,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_PLATFORM_PROBE = "from vllm.platforms import current_platform as p; print(p.device_type)"


def vllm_platform(python: str) -> str | None:
    """The device vLLM in `python`'s environment would run on ("cuda", "rocm", "cpu", ...), or
    None when that Python cannot import vLLM (it lives in its own virtualenv with its own torch)."""
    try:
        r = subprocess.run([python, "-c", _PLATFORM_PROBE], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.strip().splitlines()
    return lines[-1].strip() if r.returncode == 0 and lines else None


def resolve_engine(cfg: ServeConfig) -> tuple[str, str | None]:
    """(engine, vLLM's device type when the engine is vLLM)."""
    if cfg.engine == "native":
        return "native", None
    device = vllm_platform(cfg.vllm_python)
    if cfg.engine == "auto":
        return ("vllm", device) if device is not None else ("native", None)
    return "vllm", device


def vllm_memory_args(cfg: ServeConfig, device: str | None, available_bytes: int | None = None) -> list[str]:
    """The memory flags for vLLM: the configured share, else vLLM's own default on a GPU and an
    explicit KV-cache size on a CPU host (see the module doc)."""
    if cfg.gpu_memory_utilization is not None:
        return ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    if device == "cpu":
        if available_bytes is None:
            import psutil

            available_bytes = psutil.virtual_memory().available
        return ["--kv-cache-memory-bytes", str(cpu_kv_cache_bytes(available_bytes))]
    return []


def child_command(
    cfg: ServeConfig, engine: str, name: str, path: str, device: str | None = None
) -> list[str]:
    if engine == "vllm":
        cmd = [
            cfg.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", path, "--served-model-name", name,
            "--host", cfg.host, "--port", str(cfg.port),
            "--dtype", cfg.dtype,
            *vllm_memory_args(cfg, device),
            # Our template loops over content parts for assistant tool calls, which vLLM's "auto"
            # detection takes for OpenAI list-of-parts format and would then stringify user lists.
            "--chat-template-content-format", "string",
        ]  # fmt: skip
        if cfg.max_model_len:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        return cmd + list(cfg.vllm_extra_args)
    if engine == "native":
        return [
            sys.executable, "-m", "services.inference.native",
            "--model", path, "--name", name, "--host", cfg.host, "--port", str(cfg.port),
        ]  # fmt: skip
    raise ValueError(f"unknown engine {engine!r}")


def _error_line(lines: list[str]) -> str | None:
    """The engine's own account of why it stopped: its last line that names an error."""
    for line in reversed(lines):
        text = line.strip()
        if "error" in text.lower() or "exception" in text.lower():
            return text[-500:]
    return None


class Supervisor:
    """Owns one child server; `step()` is one poll of the published model and the child."""

    def __init__(self, cfg: ServeConfig, serving_dir: Path | None, fixed: dict | None = None, *,
                 state_dir: Path | None = None):  # fmt: skip
        if (serving_dir is None) == (fixed is None):
            raise ValueError("give either a serving_dir to watch or a fixed model")
        self.cfg, self.serving_dir, self.fixed = cfg, serving_dir, fixed
        self.state_dir = state_dir if state_dir is not None else serving_dir
        self.engine, self.device = resolve_engine(cfg)
        self.child: subprocess.Popen | None = None
        self.current: dict | None = None
        self.restarts = 0
        self.start_failures = 0  # consecutive exits before the engine answered /health
        self.healthy = False
        self.last_exit: int | None = None
        self.error: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._next_start = 0.0
        self._backoff = cfg.first_backoff_seconds
        self._state = ""
        self.waiting = WaitingServer(cfg.host, cfg.port, self.waiting_status)

    def waiting_status(self) -> tuple[int, str]:
        wanted = self.wanted()
        if wanted is None:
            return 200, f"no model yet: nothing is published in {self.serving_dir}"
        if self.error is not None:
            return 503, self.error
        return (
            503,
            f"the {self.engine} engine for {wanted['model']} is not running yet (starting, restarting)",
        )

    # ---- state file ----------------------------------------------------------------------
    def _publish_state(self, state: str) -> None:
        self._state = state
        if self.state_dir is None:
            return
        record = {
            "state": state,
            "model": (self.current or {}).get("model"),
            "path": (self.current or {}).get("path"),
            "engine": self.engine,
            "device": self.device,
            "pid": self.child.pid if self.child is not None else None,
            "restarts": self.restarts,
            "start_failures": self.start_failures,
            "last_exit_code": self.last_exit,
            "next_start_at": time.time() + max(0.0, self._next_start - time.monotonic())
            if state in ("restarting", "failed")
            else None,
            "error": self.error,
            "log_tail": list(self.tail)[-20:],
        }
        try:
            write_state(self.state_dir, record)
        except OSError as e:  # bookkeeping must never take the server down
            log.warning("cannot write the serving state: %s", e)

    # ---- child ---------------------------------------------------------------------------
    def wanted(self) -> dict | None:
        if self.fixed is not None:
            return self.fixed
        try:
            record = read_current(self.serving_dir)
        except ValueError as e:
            log.error("%s", e)
            return self.current  # keep serving what we have until the file is fixed
        if record is None:
            return None
        # published_at too: re-exporting into the same folder and publishing again must restart.
        return {"model": record["model"], "path": record["path"], "published_at": record.get("published_at")}

    def _pump(self, child: subprocess.Popen) -> None:
        """Copy the engine's output to ours, keeping its last lines for the error report."""
        assert child.stdout is not None
        for raw in iter(child.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # our stdout went away; keep draining the pipe so the engine never blocks

    def start(self, record: dict) -> None:
        check_export(Path(record["path"]))
        cmd = child_command(self.cfg, self.engine, record["model"], record["path"], self.device)
        log.info("starting %s engine for %s: %s", self.engine, record["model"], shlex.join(cmd))
        self.tail.clear()
        self.waiting.stop()  # the engine takes the port over
        # Own process group: stopping the child also stops vLLM's engine-core/worker processes.
        # The key travels in the environment (vLLM reads VLLM_API_KEY like --api-key; the native
        # server NCP_INFERENCE_API_KEY), never on a command line every local user can read.
        env = dict(os.environ)
        if self.cfg.api_key:
            env.update(VLLM_API_KEY=self.cfg.api_key, NCP_INFERENCE_API_KEY=self.cfg.api_key)
        # SIGTERM when this supervisor dies, even by -9: vLLM then stops its engine-core processes
        # itself, and no orphaned server keeps the port from the next supervisor.
        self.child = subprocess.Popen(
            cmd,
            start_new_session=True,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        threading.Thread(target=self._pump, args=(self.child,), daemon=True).start()
        self.current = record
        self.healthy = False
        self._publish_state("starting")

    def stop(self, timeout: float = 30.0) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _health(self) -> bool:
        import httpx

        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "") else self.cfg.host
        try:
            return httpx.get(f"http://{host}:{self.cfg.port}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _schedule_retry(self) -> None:
        self._next_start = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.cfg.max_backoff_seconds)

    def _child_exited(self, code: int) -> None:
        self.child, self.last_exit = None, code
        self.restarts += 1
        if self.healthy:  # it ran, then crashed: restart soon, from the first backoff again
            self.start_failures, self._backoff, self.error = 0, self.cfg.first_backoff_seconds, None
        else:
            self.start_failures += 1
        self._schedule_retry()
        reason = _error_line(list(self.tail))
        if self.start_failures >= self.cfg.max_start_failures:
            self.error = (
                f"the {self.engine} engine failed to start {self.start_failures} times in a row "
                f"(last exit code {code})" + (f": {reason}" if reason else "")
            )
            log.error("%s; retrying every %.0fs at most", self.error, self.cfg.max_backoff_seconds)
            self._publish_state("failed")
            return
        log.warning(
            "engine exited with code %s: restarting in %.0fs", code, self._next_start - time.monotonic()
        )
        self._publish_state("restarting")

    def step(self) -> None:
        wanted = self.wanted()
        if wanted != self.current:
            if self.child is not None:
                log.info("published model changed to %s: restarting", wanted)
                self.stop()
            # a new model starts with a clean slate
            self.current, self._next_start, self.error = None, 0.0, None
            self._backoff, self.start_failures = self.cfg.first_backoff_seconds, 0
            if wanted is None:
                self._publish_state("waiting")
        if self.child is not None and (code := self.child.poll()) is not None:
            self._child_exited(code)
        if self.child is not None and not self.healthy and self._health():
            self.healthy, self.start_failures, self.error = True, 0, None
            self._backoff = self.cfg.first_backoff_seconds
            self._publish_state("running")
        if self.child is None and wanted is not None and time.monotonic() >= self._next_start:
            try:
                self.start(wanted)
            except (OSError, ValueError) as e:  # unusable folder: a start failure with its reason
                log.error("cannot start the engine for %s: %s", wanted, e)
                self.current, self.error = wanted, f"cannot serve {wanted['path']}: {e}"
                self.start_failures += 1
                self._schedule_retry()
                self._publish_state("failed")
        if self.child is None:
            self.waiting.start()

    def run(self) -> None:
        stopping = False

        def _stop(signum, frame):  # noqa: ARG001
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if self.serving_dir is not None and self.wanted() is None:
            log.info("no model published yet (%s): waiting", self.serving_dir / CURRENT_FILE)
            self._publish_state("waiting")
        try:
            while not stopping:
                self.step()
                time.sleep(self.cfg.poll_seconds)
        finally:
            self.stop()
            self.waiting.stop()
            self._publish_state("stopped")


def main(argv: list[str] | None = None) -> int:
    from shared.settings import get_settings

    p = argparse.ArgumentParser(
        prog="python -m services.inference.serve", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--engine", choices=ENGINES, default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model", default=None, help="serve this export folder instead of serving/current.json")
    p.add_argument("--name", default=None, help="served model name with --model (default: folder name)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    args = p.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServeConfig.from_settings(
        settings,
        engine=args.engine,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
    )
    fixed = None
    if args.model:
        path = Path(args.model).resolve()
        check_export(path)
        fixed = {"model": args.name or path.name, "path": str(path)}
    # The state file is the platform's view of its server: written when serving what it publishes.
    Supervisor(cfg, None if fixed else settings.serving_dir, fixed).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
