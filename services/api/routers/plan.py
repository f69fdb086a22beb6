"""What a job would cost before it runs: `POST /plan` takes the body `POST /jobs` takes and answers
with the pretraining plan (parameters, FLOPs, batch, iterations, estimated wall time on a chosen
accelerator), computed by shared/nanochat/sizing.py's plan(), the function the trainer sizes
itself with. A spec `POST /jobs` would refuse gets the same 422 naming the field."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field

from services.api.deps import AuthDep, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError, error_responses
from shared.jobs.init_model import prepare_init_spec
from shared.jobs.spec import PRESETS, JobCreate, JobSpec
from shared.nanochat import sizing

router = APIRouter(prefix="/plan", tags=["plan"])

DEFAULT_GPU = "h100"


class GpusPublic(BaseModel):
    peak_flops: dict[str, float | None] = Field(description="Dense bf16 peak FLOP/s per accelerator key")
    default: str


class PlanPublic(BaseModel):
    kind: str
    trains: bool = Field(description="False when the job has no pretraining stage (nothing to size)")
    gpu: str | None = None
    gpus: int | None = Field(default=None, description="Training processes (GPUs per node x nodes)")
    params: int | None = None
    param_breakdown: dict[str, int] | None = None
    flops_per_token: int | None = None
    total_flops: float | None = None
    num_iterations: int | None = None
    horizon_from: str | None = None
    total_batch_size: int | None = None
    total_tokens: int | None = None
    tokens_per_param: float | None = None
    est_tokens_per_sec: float | None = None
    est_seconds: float | None = Field(default=None, description="At the assumed MFU; null on a CPU")
    mfu: float | None = Field(default=None, description="The MFU the estimate assumes")
    detail: dict[str, Any] | None = Field(default=None, description="The whole plan (ncp plan --json)")


def plan_for(spec: JobSpec, gpu: str, mfu: float) -> PlanPublic:
    """The pretraining plan of a validated spec, mapped the way the trainer maps it (the spec's
    None means the trainer's default, which is sizing's default)."""
    if "pretrain" not in spec.resolved_stages():
        return PlanPublic(kind=spec.kind, trains=False)
    m, hz, hw = spec.model, spec.horizon, spec.hardware
    on_cpu = hw.device == "cpu" or hw.gpus == 0
    kwargs: dict[str, Any] = {}
    if hz.target_param_data_ratio is not None:
        kwargs["target_param_data_ratio"] = hz.target_param_data_ratio
    if spec.optim.weight_decay is not None:
        kwargs["weight_decay"] = spec.optim.weight_decay
    try:
        pl = sizing.plan(
            m.depth,
            vocab_size=m.vocab_size,
            seq_len=m.sequence_len,
            device_batch_size=spec.batch.device_batch_size,
            gpus=hw.world_size,
            gpu="cpu" if on_cpu else gpu,
            total_batch_size=spec.batch.total_batch_size,
            num_iterations=hz.num_iterations,
            target_flops=hz.target_flops,
            mfu=mfu,
            aspect_ratio=m.aspect_ratio,
            head_dim=m.head_dim,
            n_kv_head=m.n_kv_head,
            window_pattern=m.window_pattern.upper(),
            **kwargs,
        )
    except ValueError as e:
        raise ApiError(422, "validation_error", str(e), _field_of(str(e))) from None
    return PlanPublic(
        kind=spec.kind,
        trains=True,
        gpu=pl.gpu,
        gpus=pl.gpus,
        params=pl.param_breakdown["total"],
        param_breakdown=pl.param_breakdown,
        flops_per_token=pl.flops_per_token,
        total_flops=pl.total_flops,
        num_iterations=pl.num_iterations,
        horizon_from=pl.horizon_from,
        total_batch_size=pl.total_batch_size,
        total_tokens=pl.total_tokens,
        tokens_per_param=pl.tokens_param_ratio,
        est_tokens_per_sec=pl.est_tokens_per_sec,
        est_seconds=pl.est_seconds,
        mfu=pl.mfu,
        detail=pl.to_dict(),
    )


def _field_of(message: str) -> str | None:
    for needle, field in (
        ("total_batch_size", "batch.total_batch_size"),
        ("device_batch_size", "batch.device_batch_size"),
        ("num_iterations", "horizon.num_iterations"),
        ("target_flops", "horizon.target_flops"),
        ("target_param_data_ratio", "horizon.target_param_data_ratio"),
        ("horizon", "horizon"),
        ("gpu", "gpu"),
    ):
        if needle in message:
            return field
    return None


@router.get("/gpus", response_model=GpusPublic, responses=_ERRORS, summary="Accelerators a plan can assume")
def plan_gpus(_auth: AuthDep) -> GpusPublic:
    return GpusPublic(peak_flops=dict(sizing.PEAK_FLOPS), default=DEFAULT_GPU)


@router.get("/presets", responses=_ERRORS, summary="Named job specs (what `ncp jobs submit --preset` uses)")
def plan_presets(_auth: AuthDep) -> dict[str, dict[str, Any]]:
    return {name: make().model_dump(mode="json") for name, make in PRESETS.items()}


@router.post(
    "",
    response_model=PlanPublic,
    responses=error_responses(400, 401, 403, 413, 422, 503),
    summary="Plan a job before submitting it",
    description="The body is a JobSpec, as for POST /jobs. Returns parameters, FLOPs, iterations and "
    "the estimated pretraining time on `gpu` at the assumed MFU; 422 names the bad field.",
)
def plan_job(
    settings: SettingsDep,
    session: SessionDep,
    _auth: AuthDep,
    body: Annotated[dict[str, Any], Body()],
    gpu: Annotated[
        str, Query(max_length=32, description="Accelerator key, see GET /plan/gpus")
    ] = DEFAULT_GPU,
    mfu: Annotated[float, Query(gt=0, le=1, description="Assumed model FLOPs utilisation")] = 0.4,
) -> PlanPublic:
    if sizing.gpu_key(gpu) is None:
        raise ApiError(
            422, "validation_error", f"gpu {gpu!r} is unknown; known: {sorted(sizing.PEAK_FLOPS)}", "gpu"
        )
    spec = JobCreate.model_validate(body, context={"roots": [settings.home, *settings.data_roots]})
    # A job on a registered model trains the checkpoint's shape: planned as POST /jobs stores it.
    spec = prepare_init_spec(session, spec)
    return plan_for(spec, gpu, mfu)
