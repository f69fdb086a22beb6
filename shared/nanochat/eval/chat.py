"""Chat-model evaluation: ARC / MMLU (categorical), GSM8K / HumanEval (generative), ChatCORE.

Categorical tasks need no sampling: the prompt ends in `<|assistant_start|>` and the answer is
the argmax of the logits at that position restricted to the choice letters. Generative tasks
sample `num_samples` completions with the Engine and pass if any of them is right (GSM8K: the
`####` number; HumanEval: the program passes the task's tests in the sandbox).
ChatCORE is the mean accuracy centred on random guessing (0.25 for 4-way choice, 0 otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.nanochat.chat_format import render_for_completion
from shared.nanochat.eval.gsm8k import is_correct as gsm8k_is_correct
from shared.nanochat.eval.sandbox import SandboxLimits, run_program
from shared.nanochat.eval.tasks import CHAT_TASKS, load_chat_task

_CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


@dataclass(frozen=True)
class ChatEvalConfig:
    tasks: tuple[str, ...] = tuple(CHAT_TASKS)
    max_per_task: int | None = None
    batch_size: int = 8  # prompts per forward in categorical tasks
    num_samples: int = 1  # completions per generative problem; pass@num_samples
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = 50
    seed: int = 42

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in CHAT_TASKS]
        if unknown or not self.tasks:
            raise ValueError(
                f"tasks: unknown or empty {unknown or list(self.tasks)}; known: {list(CHAT_TASKS)}"
            )
        if self.max_per_task is not None and self.max_per_task < 1:
            raise ValueError(f"max_per_task: must be >= 1 or None, got {self.max_per_task}")
        for name in ("batch_size", "num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(accuracies: dict[str, float]) -> float | None:
    """Mean centred accuracy over the given tasks (None when there are none)."""
    if not accuracies:
        return None
    return sum(centered(acc, CHAT_TASKS[name][3]) for name, acc in accuracies.items()) / len(accuracies)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def categorical_accuracy(model, tokenizer, conversations: list[dict], batch_size: int = 8) -> float:
    """Fraction of problems where the most likely choice letter at the answer position is right."""
    bos = tokenizer.bos_token_id
    letter_ids: dict[str, int] = {}
    passed = 0
    for i0 in range(0, len(conversations), batch_size):
        batch = conversations[i0 : i0 + batch_size]
        prompts = [render_for_completion(tokenizer, conv) for conv in batch]
        width = max(len(p) for p in prompts)
        # right padding: the answer position of each row is its own last prompt token
        ids = torch.tensor(
            [p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=_device(model)
        )
        logits = model(ids)  # (B, T, V)
        for row, (conv, prompt) in enumerate(zip(batch, prompts, strict=True)):
            letters = conv["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    enc = tokenizer.encode(letter)
                    if len(enc) != 1:
                        raise ValueError(f"answer letter {letter!r} is not a single token ({enc})")
                    letter_ids[letter] = enc[0]
            focus = logits[row, len(prompt) - 1, [letter_ids[x] for x in letters]]
            predicted = letters[int(focus.argmax())]
            passed += predicted == conv["messages"][-1]["content"]
    return passed / len(conversations)


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, else the whole completion."""
    blocks = _CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def _prompt_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (completions often leave them out)."""
    lines = []
    for line in prompt.splitlines():
        s = line.strip()
        if s.startswith(("import ", "from ")):
            lines.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(lines)


def humaneval_passes(conversation: dict, completion: str, limits: SandboxLimits | None = None) -> bool:
    program = "\n\n".join(
        [
            _prompt_imports(conversation["prompt"]),
            extract_program(completion),
            conversation["test"],
            f"check({conversation['entry_point']})\n",
        ]
    )
    return run_program(program, limits).success


def grade(task: str, conversation: dict, completion: str) -> bool:
    if task == "GSM8K":
        return gsm8k_is_correct(completion, conversation["reference"])
    if task == "HumanEval":
        return humaneval_passes(conversation, completion)
    raise ValueError(f"task: {task!r} is not generative")


def generative_accuracy(
    engine, tokenizer, task: str, conversations: list[dict], cfg: ChatEvalConfig
) -> tuple[float, list[dict]]:
    """pass@num_samples over the problems; also returns the first problems' completions."""
    passed = 0
    shown: list[dict] = []
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
    for i, conv in enumerate(conversations):
        prompt = render_for_completion(tokenizer, conv)
        results, _ = engine.generate_batch(
            prompt,
            num_samples=cfg.num_samples,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            seed=cfg.seed + i,
        )
        completions = [tokenizer.decode([t for t in seq[len(prompt) :] if t not in stop]) for seq in results]
        outcomes = [grade(task, conv, c) for c in completions]
        passed += any(outcomes)
        if len(shown) < 3:
            shown.append(
                {
                    "task": task,
                    "prompt": conv["messages"][0]["content"],
                    "completion": completions[0],
                    "passed": outcomes[0],
                }
            )
    return passed / len(conversations), shown


def evaluate_chat(model, tokenizer, tasks_dir: Path, cfg: ChatEvalConfig, engine=None) -> dict:
    """Run the configured tasks. A task whose files are missing or malformed is reported under
    `failed` and the others still run. Returns {"tasks": {name: {"accuracy", "centered", "n"}},
    "chatcore", "chatcore_complete", "failed", "samples"}."""
    if engine is None:
        from shared.nanochat.engine import Engine

        engine = Engine(model, tokenizer)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    samples: list[dict] = []
    try:
        for name in cfg.tasks:
            try:
                convs = load_chat_task(tasks_dir, name)
            except (ValueError, FileNotFoundError) as e:
                failed[name] = str(e)
                continue
            if cfg.max_per_task is not None:
                convs = convs[: cfg.max_per_task]
            if not convs:
                failed[name] = f"{name}: no problems"
                continue
            if CHAT_TASKS[name][2] == "categorical":
                acc = categorical_accuracy(model, tokenizer, convs, cfg.batch_size)
            else:
                acc, shown = generative_accuracy(engine, tokenizer, name, convs, cfg)
                samples.extend(shown)
            results[name] = {"accuracy": acc, "centered": centered(acc, CHAT_TASKS[name][3]), "n": len(convs)}
    finally:
        model.train(was_training)
    accs = {k: v["accuracy"] for k, v in results.items()}
    return {
        "tasks": results,
        "chatcore": chatcore(accs),
        # the reference reports ChatCORE only when all five tasks ran
        "chatcore_complete": set(accs) == set(CHAT_TASKS),
        "failed": failed,
        "samples": samples,
    }
