"""Serving supervisor: run the model server for the published model and keep it running.

`python -m services.inference.serve [--engine auto|vllm|native] [--port P] [--model DIR --name N]`

Reads `$NCP_HOME/serving/current.json` ({"model": name, "path": export_dir}), starts vLLM (with
our plugin) or the native server as a child process on Settings.inference_port, restarts it when
current.json changes (the pipeline published a new model) and when it crashes (with backoff).
/health and /v1/* are answered by the child. While no child runs (no model published yet, or an
engine restarting), services/inference/waiting.py answers instead: /health says "no model yet"
(healthy) or 503, everything else 503. With --model it serves that folder and ignores current.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.inference.publish import CURRENT_FILE, read_current
from services.inference.waiting import WaitingServer
from shared.loopback import is_loopback
from shared.nanochat.export import check_export

log = logging.getLogger("ncp.serve")
ENGINES = ("auto", "vllm", "native")


@dataclass(frozen=True)
class ServeConfig:
    engine: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8001
    vllm_python: str = sys.executable
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    vllm_extra_args: tuple[str, ...] = ()
    poll_seconds: float = 1.0
    max_backoff_seconds: float = 30.0
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


def vllm_importable(python: str) -> bool:
    """Whether `python` can import vLLM (it lives in its own virtualenv with its own torch)."""
    try:
        r = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def resolve_engine(cfg: ServeConfig) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    return "vllm" if vllm_importable(cfg.vllm_python) else "native"


def child_command(cfg: ServeConfig, engine: str, name: str, path: str) -> list[str]:
    if engine == "vllm":
        cmd = [
            cfg.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", path, "--served-model-name", name,
            "--host", cfg.host, "--port", str(cfg.port),
            "--dtype", cfg.dtype,
            "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
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


class Supervisor:
    """Owns one child server; `step()` is one poll of the published model and the child."""

    def __init__(self, cfg: ServeConfig, serving_dir: Path | None, fixed: dict | None = None):
        if (serving_dir is None) == (fixed is None):
            raise ValueError("give either a serving_dir to watch or a fixed model")
        self.cfg, self.serving_dir, self.fixed = cfg, serving_dir, fixed
        self.engine = resolve_engine(cfg)
        self.child: subprocess.Popen | None = None
        self.current: dict | None = None
        self.restarts = 0
        self._next_start = 0.0
        self._backoff = 1.0
        self.waiting = WaitingServer(cfg.host, cfg.port, self.waiting_status)

    def waiting_status(self) -> tuple[int, str]:
        wanted = self.wanted()
        if wanted is None:
            return 200, f"no model yet: nothing is published in {self.serving_dir}"
        return (
            503,
            f"the {self.engine} engine for {wanted['model']} is not running yet (starting, restarting)",
        )

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

    def start(self, record: dict) -> None:
        check_export(Path(record["path"]))
        cmd = child_command(self.cfg, self.engine, record["model"], record["path"])
        log.info("starting %s engine for %s: %s", self.engine, record["model"], shlex.join(cmd))
        self.waiting.stop()  # the engine takes the port over
        # Own process group: stopping the child also stops vLLM's engine-core/worker processes.
        # The key travels in the environment (vLLM reads VLLM_API_KEY like --api-key; the native
        # server NCP_INFERENCE_API_KEY), never on a command line every local user can read.
        env = dict(os.environ)
        if self.cfg.api_key:
            env.update(VLLM_API_KEY=self.cfg.api_key, NCP_INFERENCE_API_KEY=self.cfg.api_key)
        self.child = subprocess.Popen(cmd, start_new_session=True, env=env)
        self.current = record

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

    def step(self) -> None:
        wanted = self.wanted()
        if wanted != self.current and self.child is not None:
            log.info("published model changed to %s: restarting", wanted)
            self.stop()
            self.current, self._backoff, self._next_start = None, 1.0, 0.0
        if self.child is not None and self.child.poll() is not None:
            log.warning(
                "engine exited with code %s: restarting in %.0fs", self.child.returncode, self._backoff
            )
            self.child = None
            self.restarts += 1
            self._next_start = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.cfg.max_backoff_seconds)
        if self.child is None and wanted is not None and time.monotonic() >= self._next_start:
            try:
                self.start(wanted)
            except (OSError, ValueError) as e:
                log.error("cannot start the engine for %s: %s", wanted, e)
                self.current = wanted
                self._next_start = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.cfg.max_backoff_seconds)
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
        try:
            while not stopping:
                self.step()
                time.sleep(self.cfg.poll_seconds)
        finally:
            self.stop()
            self.waiting.stop()


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
    Supervisor(cfg, None if fixed else settings.serving_dir, fixed).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
