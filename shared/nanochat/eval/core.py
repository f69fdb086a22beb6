"""CORE: the in-context-learning metric of the DCLM paper, on the DCLM eval bundle format.

A bundle is a folder with `core.yaml` (the task list), `eval_data/<dataset_uri>` (JSONL, one item
per line) and `eval_meta_data.csv` (the `Random baseline` of each `Eval Task`, in percent).
Three task types:
- multiple_choice: one query, several continuations; the lowest mean continuation loss picks.
- schema: several contexts, one continuation; the lowest mean continuation loss picks.
- language_modeling: one context and continuation; right only if greedy decoding reproduces the
  whole continuation token for token.
Each task's accuracy is centred against its random baseline, CORE is the mean of those.
Few-shot examples are sampled with a per-item seed and never include the item itself, so results
are reproducible and independent of evaluation order.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from shared.nanochat.jsonl import iter_jsonl

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


class BundleError(ValueError):
    """A bundle file is malformed; the message names the file, line and problem."""


@dataclass(frozen=True)
class CoreTask:
    """One entry of core.yaml joined with its random baseline from eval_meta_data.csv."""

    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str = " "
    random_baseline: float = 0.0  # percent, as in eval_meta_data.csv
    # core.yaml row or baseline problem found while loading; the task is then reported failed
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("label: must be non-empty")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"icl_task_type: {self.task_type!r} is not one of {TASK_TYPES}")
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot: must be >= 0, got {self.num_fewshot}")
        if not 0.0 <= self.random_baseline < 100.0:
            raise ValueError(f"random_baseline: must be in [0, 100), got {self.random_baseline}")


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Map the random baseline (percent) to 0 and perfect accuracy to 1."""
    rb = 0.01 * random_baseline
    return (accuracy - rb) / (1.0 - rb)


# ----------------------------------------------------------------------------- bundle reading


def _read_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise BundleError(f"{path}: missing (needs columns 'Eval Task' and 'Random baseline')")
    out: dict[str, float] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(reader.fieldnames):
            raise BundleError(f"{path}:1: header must contain 'Eval Task' and 'Random baseline'")
        for lineno, row in enumerate(reader, start=2):
            try:
                out[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise BundleError(
                    f"{path}:{lineno}: 'Random baseline' {row['Random baseline']!r} is not a number"
                ) from None
    return out


def _parse_task(entry: Any, label: str, baselines: dict[str, float], where: str) -> CoreTask:
    if not isinstance(entry, dict):
        raise ValueError("expected a mapping")
    missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry]
    if missing:
        raise ValueError(f"missing {missing}")
    shots = entry["num_fewshot"]
    # DCLM lists the shot counts to run; like the reference we use the first.
    shots = shots[0] if isinstance(shots, list) and shots else shots
    try:
        shots = int(shots)
    except (TypeError, ValueError):
        raise ValueError(f"num_fewshot: {entry['num_fewshot']!r} is not an integer") from None
    return CoreTask(
        label=label,
        task_type=str(entry["icl_task_type"]),
        dataset_uri=str(entry["dataset_uri"]),
        num_fewshot=shots,
        continuation_delimiter=str(entry.get("continuation_delimiter", " ")),
        random_baseline=baselines.get(label, 0.0),
    )


def load_bundle(bundle_dir: Path) -> list[CoreTask]:
    """Parse core.yaml and eval_meta_data.csv. A bad task entry (or one with no baseline row)
    comes back with `error` set so the others can still run; a bad file as a whole raises."""
    bundle_dir = Path(bundle_dir)
    cfg_path = bundle_dir / "core.yaml"
    if not cfg_path.is_file():
        raise BundleError(f"{cfg_path}: missing; is {bundle_dir} an eval bundle?")
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise BundleError(f"{cfg_path}: invalid YAML: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("icl_tasks"), list):
        raise BundleError(f"{cfg_path}: expected a mapping with an 'icl_tasks' list")
    baselines = _read_baselines(bundle_dir / "eval_meta_data.csv")
    tasks = []
    for i, entry in enumerate(cfg["icl_tasks"]):
        where = f"{cfg_path}: icl_tasks[{i}]"
        label = str(entry.get("label") or f"task_{i}") if isinstance(entry, dict) else f"task_{i}"
        try:
            tasks.append(_parse_task(entry, label, baselines, where))
        except ValueError as e:
            tasks.append(CoreTask(label, "language_modeling", "", 0, error=f"{where} ({label}): {e}"))
        if label not in baselines and tasks[-1].error is None:
            tasks[-1] = CoreTask(
                label,
                "language_modeling",
                "",
                0,
                error=f"{bundle_dir / 'eval_meta_data.csv'}: no 'Random baseline' row for task {label!r}",
            )
    return tasks


def _check_item(item: Any, task_type: str) -> str | None:
    """Return what is wrong with one JSONL item for this task type, or None."""
    if not isinstance(item, dict):
        return "expected a JSON object"

    def _str(key: str) -> str | None:
        return None if isinstance(item.get(key), str) else f"field {key!r} must be a string"

    def _options(key: str) -> str | None:
        opts = item.get(key)
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
            return f"field {key!r} must be a list of at least 2 strings"
        gold = item.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(opts):
            return f"field 'gold' must be an index into {key!r} (0..{len(opts) - 1}), got {gold!r}"
        return None

    if task_type == "multiple_choice":
        return _str("query") or _options("choices")
    if task_type == "schema":
        return _options("context_options") or _str("continuation")
    return _str("context") or _str("continuation")


def load_task_data(path: Path, task_type: str) -> list[dict]:
    """Read a task's JSONL, checking every item's fields; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: missing data file")
    items = []
    for where, item in iter_jsonl(path, BundleError):
        problem = _check_item(item, task_type)
        if problem:
            raise BundleError(f"{where}: {problem} ({task_type})")
        items.append(item)
    if not items:
        raise BundleError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- prompts


def render_prompts(item: dict, task: CoreTask, fewshot: list[dict]) -> list[str]:
    """Full prompt texts for one item: one per choice (MC), per context (schema), or
    [without, with] continuation (LM). Few-shot examples come first, separated by blank lines."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    # LM contexts in the public data carry stray trailing whitespace; trimming keeps the prompt
    # without the continuation a clean token prefix of the prompt with it.
    shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{d}"
    return [without.strip(), without + item["continuation"]]


def _common_length(seqs: list[list[int]], from_end: bool) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        idx = -1 - i if from_end else i
        if any(s[idx] != seqs[0][idx] for s in seqs):
            return i
    return n


def token_spans(
    tokenizer, prompts: list[str], task_type: str
) -> tuple[list[list[int]], list[int], list[int]]:
    """Tokenize (BOS first) and locate the scored span [start, end) of every sequence."""
    bos = tokenizer.bos_token_id
    toks = [tokenizer.encode(p, prepend=bos) for p in prompts]
    if task_type == "multiple_choice":  # shared context, differing continuations
        start = _common_length(toks, from_end=False)
        # a choice that is a token prefix of another would score an empty span (NaN): score at
        # least its last token
        return toks, [min(start, len(t) - 1) for t in toks], [len(t) for t in toks]
    if task_type == "schema":  # differing contexts, shared continuation
        suffix = _common_length(toks, from_end=True)
        return toks, [len(t) - suffix for t in toks], [len(t) for t in toks]
    without, with_ = toks
    if len(without) >= len(with_) or with_[: len(without)] != without:
        raise ValueError("prompt without the continuation does not tokenize to a prefix of the full prompt")
    return [with_], [len(without)], [len(with_)]


def _crop(toks, starts, ends, max_len: int | None):
    """Keep the last `max_len` tokens of sequences longer than the model can read at all (the
    scored span is at the end). Only past the positions the model has: upstream scores the whole
    prompt, even beyond the training context (its rotary table covers 10x)."""
    if max_len is None:
        return toks, starts, ends
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(toks, starts, ends, strict=True):
        cut = max(0, len(t) - max_len)
        if s - cut < 1:
            raise ValueError(f"continuation longer than the model's positions ({max_len} tokens)")
        out_t.append(t[cut:])
        out_s.append(s - cut)
        out_e.append(e - cut)
    return out_t, out_s, out_e


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _model_max_len(model) -> int | None:
    """How many positions the model can read: our GPT's rotary table (10x its sequence_len, as
    upstream's), not the training context. None: no limit known."""
    rotary = getattr(model, "cos", None)
    return int(rotary.shape[1]) if isinstance(rotary, torch.Tensor) else None


@torch.no_grad()
def score_item(model, tokenizer, data: list[dict], idx: int, task: CoreTask) -> bool:
    """Whether the model gets item `idx` of `data` right."""
    item = data[idx]
    fewshot: list[dict] = []
    if task.num_fewshot > 0:
        rng = random.Random(1234 + idx)
        others = [i for i in range(len(data)) if i != idx]
        fewshot = [data[i] for i in rng.sample(others, min(task.num_fewshot, len(others)))]
    prompts = render_prompts(item, task, fewshot)
    toks, starts, ends = token_spans(tokenizer, prompts, task.task_type)
    toks, starts, ends = _crop(toks, starts, ends, _model_max_len(model))
    width = max(len(t) for t in toks)
    ids = torch.full(
        (len(toks), width), tokenizer.bos_token_id, dtype=torch.long
    )  # pad positions are never scored
    for i, t in enumerate(toks):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(_model_device(model))
    logits = model(ids).float()  # (B, T, V)
    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        # position p predicts token p+1
        return bool(torch.equal(logits[0, s - 1 : e - 1].argmax(-1), ids[0, s:e]))
    mean_losses = []
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        loss = F.cross_entropy(logits[i, s - 1 : e - 1], ids[i, s:e], reduction="mean")
        mean_losses.append(loss.item())
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, tokenizer, data: list[dict], task: CoreTask) -> float:
    """Accuracy of the model on one task's items."""
    return sum(score_item(model, tokenizer, data, i, task) for i in range(len(data))) / len(data)


def evaluate_core(model, tokenizer, bundle_dir: Path, *, max_per_task: int | None = None) -> dict:
    """Run every task of the bundle. A task whose data is malformed is reported under `failed`
    (with the file/line message) and left out of the CORE mean; the other tasks still run.

    Returns {"results": {label: acc}, "centered": {label: c}, "core": mean or None,
             "failed": {label: message}, "num_items": {label: n}}.
    """
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task: must be >= 1 or None, got {max_per_task}")
    bundle_dir = Path(bundle_dir)
    tasks = load_bundle(bundle_dir)
    results: dict[str, float] = {}
    centered: dict[str, float] = {}
    failed: dict[str, str] = {}
    num_items: dict[str, int] = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for task in tasks:
            if task.error:
                failed[task.label] = task.error
                continue
            try:
                data = load_task_data(bundle_dir / "eval_data" / task.dataset_uri, task.task_type)
                # fixed shuffle so a max_per_task subset is the same every run
                random.Random(1337).shuffle(data)
                if max_per_task is not None:
                    data = data[:max_per_task]
                acc = evaluate_task(model, tokenizer, data, task)
            except ValueError as e:
                failed[task.label] = str(e)
                continue
            results[task.label] = acc
            centered[task.label] = centered_accuracy(acc, task.random_baseline)
            num_items[task.label] = len(data)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    core = sum(centered.values()) / len(centered) if centered else None
    return {"results": results, "centered": centered, "core": core, "failed": failed, "num_items": num_items}
