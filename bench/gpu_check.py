"""The one-shot GPU check: every GPU path of the platform in at most 8 minutes, one table.

    bash bench/gpu_check.sh            # a GPU box: installs missing wheels from .whl/, then this
    bash bench/gpu_check.sh --dry-run  # CPU, tiny sizes: everything but the device (a test runs it)

Sections, each time-boxed and run in child processes, so a crash, hang or OOM is a FAIL row
rather than the end of the check:
  env      device, torch/Triton, which attention kernels and FP8 formats this box has
  tests    `pytest -m gpu` (attention kernels vs the math reference, FP8 vs bf16, ...)
  step     bench/train_step.py at depth 24, T 2048: auto kernels vs the math-SDPA baseline, bf16
           vs FP8, tokens/s and MFU (device batch halved until it fits)
  resume   a real `ncp train` of a small model: an uninterrupted run, a run SIGKILLed after its
           checkpoint, the resumed run; the resumed losses against both
  serve    the native server on that model: decode tokens/s at concurrency 1 and 32
Exit status 0 when no row failed. The performance targets (issue 12: MFU >= ~50% on H100/H200,
auto >= 1.5x math, FP8 >= 1.15x bf16) are printed beside the numbers, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole check, GPU mode

# Per mode: sizes and each section's time box (seconds).
# The d24 math baseline materialises fp32 T x T scores: it starts at a quarter of the batch.
GPU: dict[str, Any] = {
    "tests_s": 90,
    "step": dict(
        depth=24, seq_len=2048, batch=16, baseline_batch=4, vocab=32768, head_dim=128, steps=5, warmup=2
    ),
    "step_s": 230,
    "resume": dict(depth=4, seq_len=512, batch=16, vocab=4096, steps=300, save_every=150, kill_after=10),
    "resume_s": 110,
    "serve": dict(prompt=128, max_tokens=64, levels=(1, 32)),
    "serve_s": 45,
}
DRY: dict[str, Any] = {
    "tests_s": 120,
    "step": dict(depth=2, seq_len=256, batch=2, baseline_batch=2, vocab=512, head_dim=64, steps=2, warmup=1),
    "step_s": 120,
    "resume": dict(depth=2, seq_len=64, batch=4, vocab=512, steps=40, save_every=20, kill_after=2),
    "resume_s": 150,
    "serve": dict(prompt=16, max_tokens=8, levels=(1, 32)),
    "serve_s": 90,
}


@dataclass
class Row:
    section: str
    check: str
    status: str  # ok | FAIL | skip | info
    value: str = ""
    detail: str = ""


class Check:
    def __init__(self, dry_run: bool, work: Path):
        self.dry_run = dry_run
        self.sizes = DRY if dry_run else GPU
        self.work = work
        self.rows: list[Row] = []
        path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run must not touch a GPU even if there is one
            self.env["OMP_NUM_THREADS"] = "1"
        self.device = "cpu" if dry_run else "cuda"
        self.deadline = time.time() + BUDGET_S

    def budget(self, key: str) -> float:
        """A section's time box, cut to what is left of the whole check's budget (GPU mode)."""
        left = self.deadline - time.time()
        return max(10.0, min(self.sizes[key], left)) if not self.dry_run else self.sizes[key]

    def add(self, *args, **kw) -> None:
        self.rows.append(Row(*args, **kw))

    def run(self, cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )

    def section(self, name: str, fn) -> None:
        t0 = time.time()
        try:
            fn()
        except subprocess.TimeoutExpired as e:
            self.add(name, "time box", "FAIL", f"{e.timeout:.0f} s", "section ran past its time box")
        except Exception as e:  # a broken section is a row, never the end of the check
            self.add(name, "section", "FAIL", "", f"{type(e).__name__}: {str(e)[-400:]}")
        self.add(name, "wall time", "info", f"{time.time() - t0:.0f} s")

    # --- env -------------------------------------------------------------------------------------
    def section_env(self) -> None:
        code = (
            "import json, torch\n"
            "from shared.nanochat.attention import available_backends, kernel_module\n"
            "from shared.nanochat.device import detect_device\n"
            "from shared.nanochat import fp8\n"
            f"dev = detect_device({self.device!r})\n"
            "try:\n import triton; tv = triton.__version__\nexcept ImportError:\n tv = None\n"
            "print(json.dumps({'name': dev.name, 'backend': dev.backend, 'peak': dev.peak_flops,"
            " 'torch': torch.__version__, 'cuda': torch.version.cuda, 'hip': torch.version.hip, 'triton': tv,"
            f" 'backends': available_backends({self.device!r}),"
            " 'fa3': kernel_module('fa3').source, 'flash': kernel_module('flash').source,"
            f" 'fp8': fp8.unsupported_reason({self.device!r}) or fp8.formats_for({self.device!r}).name}}))\n"
        )
        p = self.run([sys.executable, "-c", code], 120)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        e = json.loads(p.stdout.strip().splitlines()[-1])
        toolkit = f"CUDA {e['cuda']}" if e["cuda"] else f"HIP {e['hip']}" if e["hip"] else "cpu"
        peak = f"{e['peak']:.4g} FLOP/s bf16 peak" if e["peak"] else "peak unknown (no MFU)"
        self.add("env", "device", "info", e["name"], f"{e['backend']}, {peak}")
        self.add("env", "torch", "info", e["torch"], f"{toolkit}, Triton {e['triton']}")
        self.add(
            "env",
            "attention backends",
            "info",
            ", ".join(e["backends"]),
            f"fa3: {e['fa3']} | flash: {e['flash']}",
        )
        self.add("env", "fp8", "info", e["fp8"])

    # --- GPU tests -------------------------------------------------------------------------------
    def section_tests(self) -> None:
        files = sorted(
            str(p.relative_to(REPO))
            for p in (REPO / "tests").rglob("test_*.py")
            if "pytest.mark.gpu" in p.read_text(encoding="utf-8")
        )
        junit = self.work / "gpu_tests.xml"
        env_extra = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # a bare box has no plugins to load
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]
        try:
            p = subprocess.run(
                [*cmd, *files],
                cwd=REPO,
                env={**self.env, **env_extra},
                capture_output=True,
                text=True,
                timeout=self.budget("tests_s"),
            )
        except subprocess.TimeoutExpired as e:  # keep what pytest printed so far: its progress line
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            self.add("tests", "pytest -m gpu", "FAIL", f"time box {e.timeout:.0f} s", out.strip()[-300:])
            return
        if not junit.exists():
            raise RuntimeError(f"pytest exit {p.returncode}: {(p.stdout + p.stderr)[-600:]}")
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        failed, skip_reasons = [], set()
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                failed.append(case.get("name", "?"))
            elif (skipped := case.find("skipped")) is not None:
                counts["skipped"] += 1
                skip_reasons.add((skipped.get("message") or "").removeprefix("Skipped: ")[:60])
            else:
                counts["passed"] += 1
        value = ", ".join(f"{n} {k}" for k, n in counts.items())
        status = "FAIL" if counts["failed"] or p.returncode not in (0, 5) else "ok"
        detail = f"failed: {', '.join(failed[:6])}" if failed else "; ".join(sorted(skip_reasons))[:200]
        self.add("tests", f"pytest -m gpu ({len(files)} files)", status, value, detail)

    # --- training step ---------------------------------------------------------------------------
    def section_step(self) -> None:
        s = self.sizes["step"]
        out = self.work / "train_step.json"
        cmd = [
            sys.executable, "bench/train_step.py", "--depth", str(s["depth"]), "--seq-len", str(s["seq_len"]),
            "--device-batch-size", str(s["batch"]), "--vocab", str(s["vocab"]), "--head-dim", str(s["head_dim"]),
            "--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--fp8", "--fit-batch", "--json", str(out),
            "--baseline-batch", str(s["baseline_batch"]),
        ]  # fmt: skip
        try:
            p = self.run(cmd, self.budget("step_s"))
            failure = (
                None
                if p.returncode == 0
                else f"train_step exit {p.returncode}: {(p.stdout + p.stderr)[-600:]}"
            )
        except subprocess.TimeoutExpired as e:  # rows of the runs that finished still count
            failure = f"ran past its {e.timeout:.0f} s time box"
        runs = {r["backend"]: r for r in json.loads(out.read_text())["runs"]} if out.exists() else {}
        if failure:
            self.add("step", "bench/train_step.py", "FAIL", "", failure)
        for name, r in runs.items():
            mfu = f"{100 * r['mfu']:.1f}% MFU" if r["mfu"] is not None else "no MFU"
            detail = f"{r['resolved']}, batch {r['batch']}, {'compiled' if r['compiled'] else 'eager'}"
            if r["slow_fallbacks"]:
                detail += "; SLOW: " + "; ".join(r["slow_fallbacks"])
            self.add(
                "step",
                f"d{s['depth']} T{s['seq_len']} {name}",
                "ok",
                f"{r['tok_s']:,.0f} tok/s, {mfu}",
                detail,
            )
        auto, math_, fp8 = runs.get("auto"), runs.get("math"), runs.get("auto fp8")
        if auto and math_:
            self.add(
                "step",
                "auto / math tokens/s",
                "ok",
                f"{auto['tok_s'] / math_['tok_s']:.2f}x",
                "target >= 1.5x on GPU",
            )
        if auto and fp8:
            self.add(
                "step",
                "fp8 / bf16 tokens/s",
                "ok",
                f"{fp8['tok_s'] / auto['tok_s']:.2f}x",
                "target >= 1.15x on GPU",
            )
        if auto and auto["mfu"] is not None:
            self.add(
                "step", "bf16 MFU", "ok", f"{100 * auto['mfu']:.1f}%", "target ~50% (H100/H200), 45% (MI300X)"
            )

    # --- train, kill, resume ---------------------------------------------------------------------
    def _corpus(self) -> tuple[Path, Path]:
        s = self.sizes["resume"]
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from shared.nanochat.corpus import iter_shard_texts, split_shards\n"
            "from shared.nanochat.demo_corpus import write_demo_corpus\n"
            "from shared.nanochat.tokenizer import train_tokenizer\n"
            "root = Path(sys.argv[1])\n"
            "write_demo_corpus(root / 'data', num_shards=3, seed=0, max_bytes=int(sys.argv[3]))\n"
            "train, _ = split_shards(root / 'data')\n"
            "train_tokenizer(iter_shard_texts(train), vocab_size=int(sys.argv[2]), out_dir=root / 'tokenizer')\n"
        )
        max_bytes = 400_000 if self.dry_run else 4_000_000
        p = self.run([sys.executable, "-c", code, str(self.work), str(s["vocab"]), str(max_bytes)], 120)
        if p.returncode != 0:
            raise RuntimeError(f"corpus: {p.stderr[-600:]}")
        return self.work / "data", self.work / "tokenizer"

    def _train_cmd(self, data: Path, tok: Path, ckpt: Path, progress: Path) -> list[str]:
        s = self.sizes["resume"]
        return [
            sys.executable, "-m", "services.cli.main", "train", "--data", str(data), "--tokenizer", str(tok),
            "--checkpoint-dir", str(ckpt), "--depth", str(s["depth"]), "--max-seq-len", str(s["seq_len"]),
            "--device-batch-size", str(s["batch"]), "--total-batch-size", str(s["batch"] * s["seq_len"]),
            "--num-iterations", str(s["steps"]), "--save-every", str(s["save_every"]), "--eval-every", "0",
            "--device", self.device, "--progress-file", str(progress), "--set", "eval_tokens=8192",
            "--set", "window_pattern=SSSL", "--set", "warmup_steps=10",
        ] + (["--set", "aspect_ratio=32", "--set", "head_dim=64"] if self.dry_run else [])  # fmt: skip

    @staticmethod
    def _losses(progress: Path) -> dict[int, float]:
        out = {}
        for line in progress.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # the writer's current line, read half-written
                continue
            if r["type"] == "progress":
                out[r["step"]] = r["raw_loss"]
        return out

    def section_resume(self) -> None:
        s = self.sizes["resume"]
        deadline = time.time() + self.budget("resume_s")
        data, tok = self._corpus()
        self.data, self.tok = data, tok
        full_p, cut_p, resumed_p = (self.work / f"{n}.jsonl" for n in ("full", "killed", "resumed"))
        full = self.run(self._train_cmd(data, tok, self.work / "ckpt_full", full_p), deadline - time.time())
        if full.returncode != 0:
            raise RuntimeError(f"uninterrupted run exit {full.returncode}: {full.stderr[-600:]}")
        kernels = next(json.loads(x) for x in full_p.read_text().splitlines() if '"kernels"' in x)["kernels"]
        attention = ", ".join(f"{k} {v}" for k, v in sorted(kernels["attention"].items()))
        self.add(
            "resume",
            "kernel report (first progress record)",
            "FAIL" if kernels["slow_fallbacks"] else "ok",
            f"{attention}; {'compiled' if kernels['compiled'] else 'eager'}, {kernels['compute_dtype']}",
            "; ".join(kernels["slow_fallbacks"]) or f"no slow fallback; {kernels['device']}",
        )
        # The run to kill: SIGKILL once it has checkpointed and trained a few steps past it.
        ckpt = self.work / "ckpt_cut"
        cut_log = (self.work / "killed.log").open("w")
        proc = subprocess.Popen(
            self._train_cmd(data, tok, ckpt, cut_p),
            cwd=REPO, env=self.env, stdout=cut_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        target = s["save_every"] + s["kill_after"]
        killed_at = None
        try:
            while time.time() < deadline and proc.poll() is None:
                losses = self._losses(cut_p) if cut_p.exists() else {}
                if losses and max(losses) >= target:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = max(losses)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                _stop(proc)
            cut_log.close()
        if killed_at is None:
            tail = (self.work / "killed.log").read_text(errors="replace")[-400:]
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before it could be killed: {tail}")
        resumed = self.run(self._train_cmd(data, tok, ckpt, resumed_p), deadline - time.time())
        if resumed.returncode != 0:
            raise RuntimeError(f"resumed run exit {resumed.returncode}: {resumed.stderr[-600:]}")
        a, cut, b = self._losses(full_p), self._losses(cut_p), self._losses(resumed_p)
        resumed_steps = sorted(b)
        if not resumed_steps or resumed_steps[0] != s["save_every"] + 1 or resumed_steps[-1] != s["steps"]:
            raise RuntimeError(f"resumed run covered steps {resumed_steps[:1]}..{resumed_steps[-1:]}")
        self.add("resume", f"ncp train d{s['depth']} x {s['steps']} steps", "ok", f"killed at step {killed_at}",
                 f"checkpoint at {s['save_every']}; loss {a[1]:.3f} -> {a[s['steps']]:.3f}")  # fmt: skip
        # Same checkpoint, same batches: the resumed steps redo what the killed run did after it.
        redo = [abs(b[i] - cut[i]) for i in range(s["save_every"] + 1, int(killed_at) + 1)]
        after = [abs(b[i] - a[i]) for i in resumed_steps]
        self.add(
            "resume", "resumed vs killed run (same steps)", _exact(redo), _delta(redo), f"{len(redo)} steps"
        )
        self.add(
            "resume", "resumed vs uninterrupted run", _exact(after), _delta(after), f"{len(after)} steps"
        )
        self.ckpt = ckpt

    # --- serving ---------------------------------------------------------------------------------
    def section_serve(self) -> None:
        s = self.sizes["serve"]
        if not hasattr(self, "ckpt"):
            self.add("serve", "native server", "skip", "", "needs the model of the resume section")
            return
        export = self.work / "export"
        code = (
            "import sys\nfrom shared.nanochat.export import export_model\n"
            "export_model(sys.argv[1], None, sys.argv[2], sys.argv[3], served_name='check', dtype=sys.argv[4])\n"
        )
        dtype = "float32" if self.dry_run else "bfloat16"
        p = self.run([sys.executable, "-c", code, str(self.ckpt), str(self.tok), str(export), dtype], 60)
        if p.returncode != 0:
            raise RuntimeError(f"export: {p.stderr[-600:]}")
        port = _free_port()
        cmd = [sys.executable, "-m", "services.inference.native", "--model", str(export), "--name", "check",
               "--port", str(port), "--device", self.device, "--max-batch", str(max(s["levels"]))]  # fmt: skip
        log = (self.work / "native.log").open("w")
        server = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_healthy(port, server, self.budget("serve_s") / 2)
            for level in s["levels"]:
                tok_s, tokens = _decode_rate(port, level, s["prompt"], s["max_tokens"])
                self.add(
                    "serve",
                    f"native decode, concurrency {level}",
                    "ok",
                    f"{tok_s:,.1f} tok/s",
                    f"{tokens} tokens",
                )
        except RuntimeError as e:
            tail = (self.work / "native.log").read_text(errors="replace")[-400:]
            raise RuntimeError(f"{e}; log: {tail}") from None
        finally:
            _stop(server)
            log.close()

    def print_table(self, started: float) -> None:
        mode = "dry run (CPU, tiny sizes)" if self.dry_run else "GPU"
        print(
            f"\ngpu_check: {mode}; {time.time() - started:.0f} s; command: bash bench/gpu_check.sh{' --dry-run' if self.dry_run else ''}"
        )
        print("| section | check | status | value | detail |")
        print("|---|---|---|---|---|")
        for r in self.rows:
            print(f"| {r.section} | {r.check} | {r.status} | {r.value} | {r.detail.replace('|', '/')} |")


def _exact(diffs: list[float]) -> str:
    return "ok" if diffs and max(diffs) < 0.02 else "FAIL"


def _delta(diffs: list[float]) -> str:
    if not diffs:
        return "no steps to compare"
    return "bit-identical" if max(diffs) == 0 else f"max |dloss| {max(diffs):.2e}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL after 20 s; a group already gone is fine."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict, timeout: float = 300) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"native server exited with {proc.returncode} (see native.log)")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"native server not healthy within {timeout:.0f} s")


def _decode_rate(port: int, concurrency: int, prompt_len: int, max_tokens: int) -> tuple[float, int]:
    """Greedy completions of random prompts, `concurrency` at once; output tokens per second."""
    prompts = [[(17 * i + 31 * j) % 250 + 1 for j in range(prompt_len)] for i in range(max(4, concurrency))]

    def one(prompt: list[int]) -> int:
        body = {"model": "check", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return int(_post(port, "/v1/completions", body)["usage"]["completion_tokens"])

    one(prompts[0])  # warm-up: first-request allocations and kernel selection
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, prompts))
    return tokens / (time.perf_counter() - t0), tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU and tiny sizes: everything but the device")
    p.add_argument("--sections", default="env,tests,step,resume,serve", help="comma list (default: all)")
    p.add_argument("--work-dir", help="keep intermediate files here (default: a temporary folder)")
    args = p.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        check = Check(args.dry_run, work)
        if not args.dry_run:
            check.env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
        for name in args.sections.split(","):
            check.section(name, getattr(check, f"section_{name}"))
        check.print_table(started)
    return 1 if any(r.status == "FAIL" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
