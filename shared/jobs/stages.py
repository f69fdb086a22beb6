"""The pipeline's stages: the one list of them, in order, with the queue each runs on.

A job spec chooses a subset of the selectable stages (always in this order); every job then closes
with the `report` stage, which reads whatever the others wrote. A stage marked `alone` (`import`,
which brings in a model trained elsewhere) is no part of the pipeline: it is the one stage of its
own job kind and is never mixed with the others. The API, the dispatcher, the
workers and the reconciler all read the order and the queues from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.jobs.queues import DATA, EVAL, TRAIN


@dataclass(frozen=True)
class StageDef:
    name: str
    queue: str  # CPU-light corpus work on `data`, GPU-holding training on `train`, the rest on `eval`
    selectable: bool = True  # False: added by the platform, never named in a spec
    needs_model: bool = False  # reads a model made by `pretrain` (this job's or the parent's)
    alone: bool = False  # the only stage of its job kind (the kind of the same name), never mixed


PIPELINE: tuple[StageDef, ...] = (
    StageDef("import", DATA, alone=True),  # file conversion, no GPU: the data queue's kind of work
    StageDef("data", DATA),
    StageDef("tokenizer", DATA),
    StageDef("pretrain", TRAIN),
    StageDef("base_eval", EVAL, needs_model=True),
    StageDef("sft", TRAIN, needs_model=True),
    StageDef("chat_eval", EVAL, needs_model=True),
    StageDef("export", EVAL, needs_model=True),
    StageDef("serve", EVAL, needs_model=True),
    StageDef("report", EVAL, selectable=False),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in PIPELINE)
SELECTABLE_STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE if s.selectable)
FINAL_STAGE = "report"  # closes every job
NEEDS_MODEL: frozenset[str] = frozenset(s.name for s in PIPELINE if s.needs_model)
STAGE_QUEUES: dict[str, str] = {s.name: s.queue for s in PIPELINE}
ALONE_STAGES: frozenset[str] = frozenset(s.name for s in PIPELINE if s.alone)
# The stages a pipeline job may run: everything selectable except the stand-alone ones.
PIPELINE_STAGES: tuple[str, ...] = tuple(s for s in SELECTABLE_STAGES if s not in ALONE_STAGES)

# What each job kind runs when its spec names no stages.
DEFAULT_STAGES: dict[str, tuple[str, ...]] = {
    "pipeline": PIPELINE_STAGES,
    "pretrain": ("data", "tokenizer", "pretrain", "base_eval"),
    "sft": ("sft", "chat_eval"),
    "eval": ("base_eval",),
    "import": ("import",),
}


def queue_for_stage(stage: str) -> str:
    """The queue a stage's task is sent to; unknown stages are a programming error, named."""
    try:
        return STAGE_QUEUES[stage]
    except KeyError:
        raise ValueError(f"stage {stage!r} has no queue; known stages: {list(STAGE_NAMES)}") from None


def check_stage_selection(stages: Sequence[str]) -> None:
    """ValueError naming the problem unless `stages` is a non-empty, ordered, duplicate-free
    selection of SELECTABLE_STAGES."""
    if not stages:
        raise ValueError("stages must not be empty (omit it for the kind's default)")
    unknown = [s for s in stages if s not in SELECTABLE_STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages are {list(SELECTABLE_STAGES)}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"stages lists a stage twice: {list(stages)}")
    alone = [s for s in stages if s in ALONE_STAGES]
    if alone and len(stages) > 1:
        raise ValueError(
            f"stage {alone[0]!r} runs alone (a job of kind {alone[0]!r}); it cannot be combined with "
            f"{[s for s in stages if s != alone[0]]}"
        )
    if list(stages) != sorted(stages, key=SELECTABLE_STAGES.index):
        raise ValueError(f"stages must be in pipeline order {list(SELECTABLE_STAGES)}, got {list(stages)}")


def job_stages(spec_stages: Iterable[str]) -> list[str]:
    """Every stage a job runs, in order: the spec's, then the closing report."""
    return [*spec_stages, FINAL_STAGE]


def next_stage(spec_stages: Iterable[str], stage: str) -> str | None:
    stages = job_stages(spec_stages)
    i = stages.index(stage)
    return stages[i + 1] if i + 1 < len(stages) else None


def first_unfinished(spec_stages: Iterable[str], done: Iterable[str]) -> str | None:
    """The stage a (re)started job continues with: the first one not succeeded or skipped."""
    finished = set(done)
    return next((name for name in job_stages(spec_stages) if name not in finished), None)
