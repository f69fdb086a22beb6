"""Where a job's model comes from, besides training it or a parent job's run folder: a model in the
registry (`init`, with `resume` saying what of its training state to load) or an upstream run to
import (`import`). Sections of the job spec (shared/jobs/spec.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from shared.db.models import MAX_INT32
from shared.jobs.spec_fields import Strict, Text, train_default
from shared.nanochat.nanochat_import import NAME_PATTERN, validate_name


class ImportSpec(Strict):
    """What an `import` job brings in: a model trained elsewhere, as a named platform model."""

    source: Literal["nanochat"] = Field(
        default="nanochat", description="Format of the source: an upstream nanochat base dir"
    )
    path: Text = Field(
        min_length=1,
        max_length=4096,
        description="The base dir (tokenizer/, base_checkpoints/, chatsft_checkpoints/, any subset) "
        "under an allowed root; it must exist",
    )
    name: Text = Field(
        min_length=1,
        max_length=64,
        description="Model name: letters, digits, '.', '_' or '-', starting with a letter or digit",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_name(v)  # the importer's rule, so the stage never refuses a name we took
        except ValueError as e:
            raise ValueError(str(e).removeprefix("name: ")) from None


# A model name in the model registry (`ncp import nanochat DIR --name NAME`, a finished job's model):
# the importer's rule (shared/nanochat/nanochat_import.py validate_name).
MODEL_NAME_PATTERN = NAME_PATTERN
# Phases a job may start from (the registry's checkpoint phases a trainer can read).
INIT_PHASES = ("base", "sft")


class InitSpec(Strict):
    """Start from a registered model instead of a parent job's run folder (issue #13).

    Which checkpoint each stage reads: `phase` when given, for every stage that reads the model.
    When left out, the stages that read a base model (pretrain, base_eval, sft) read its `base`
    checkpoints, and those that read a chat model (chat_eval, export, serve) read its `sft`
    checkpoints when it has any, else its `base` ones. `step` picks the step in that phase.
    """

    model: Text = Field(
        max_length=64, pattern=MODEL_NAME_PATTERN, description="Registered model to start from"
    )
    step: Annotated[int, Field(ge=0, le=MAX_INT32)] | Literal["latest"] = Field(
        default="latest", description="Checkpoint step of the model; 'latest' = its newest"
    )
    phase: Literal["base", "sft"] | None = Field(
        default=None, description="Checkpoint phase; None = base for base readers, sft (if any) for chat"
    )

    @property
    def step_or_none(self) -> int | None:
        """The step to ask the registry for; None = the newest."""
        return None if self.step == "latest" else int(self.step)


class ResumeSpec(Strict):
    optimizer: Literal["saved", "fresh"] = Field(
        default=train_default("resume_optimizer"),
        description="Training from `init`: 'saved' loads the checkpoint's optimizer state (resharded "
        "when its rank count differs), 'fresh' loads the weights only",
    )
