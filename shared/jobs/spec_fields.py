"""The job spec's vocabulary: the strict base model, the constrained field types, the trainer
defaults the spec refers to, and errors located at a field (shared/jobs/spec.py builds on these).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.db.models import MAX_INT32
from shared.jobs.stages import SELECTABLE_STAGES
from shared.nanochat.sft_config import SFTConfig
from shared.nanochat.train_config import TrainConfig

# Every count a spec gives is bounded by the registry's 32-bit integer columns (shared/db/models.py;
# step counts end up in them). Token and character budgets never reach an integer column and may be
# larger, up to what a JSON number carries exactly.
MAX_JSON_INT = 2**53 - 1


def config_default(cls: type, name: str) -> Any:
    """The default of dataclass field `cls.name`: the one definition the spec refers to."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise AssertionError(f"{cls.__name__}.{name} has no default to refer to")
            return f.default
    raise AssertionError(f"{cls.__name__} has no field {name!r}")


def train_default(name: str) -> Any:
    return config_default(TrainConfig, name)


def sft_default(name: str) -> Any:
    return config_default(SFTConfig, name)


def field_error(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A ValidationError located at `loc`, for checks that span several fields."""
    err = PydanticCustomError("value_error", "{reason}", {"reason": message})
    return ValidationError.from_exception_data("JobSpec", [InitErrorDetails(type=err, loc=loc, input=value)])


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; a spec string lands in events, errors and file names.
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _known_stage(value: str) -> str:
    if value not in SELECTABLE_STAGES:
        raise ValueError(f"unknown stage {value!r}; stages are {list(SELECTABLE_STAGES)}")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
StageName = Annotated[str, AfterValidator(_known_stage)]
Count = Annotated[int, Field(le=MAX_INT32)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
