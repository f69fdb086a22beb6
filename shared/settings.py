"""Every platform-level knob, defined once.

All services (API, workers, inference supervisor, CLI) read their configuration through
`get_settings()`. Environment variables use the prefix `NCP_` (e.g. `NCP_DATABASE_URL`); compose
files, the Helm chart's ConfigMap and `.env` feed exactly these fields, and a test checks that no
deployment file sets a key this class does not know.

The defaults are the *embedded* mode: one machine, no Docker, SQLite registry, no broker server,
data under `~/.ncp` (or `$NCP_HOME`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that appear in `.env.example` and must never reach a running service.
PLACEHOLDER_SECRETS = {"changeme", "change-me", "CHANGE_ME", "changethis", "<set-me>"}


def default_home() -> Path:
    return Path.home() / ".ncp"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NCP_", extra="ignore", frozen=True)

    # --- where things live -------------------------------------------------------------------
    home: Path = Field(default_factory=default_home, description="Root of runs, datasets, serving state")
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Extra directories a job spec may read local corpora from (besides NCP_HOME)",
    )

    # --- registry and broker -----------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: built from NCP_DB_* when NCP_DB_HOST is set, else SQLite under NCP_HOME",
    )
    # PostgreSQL as separate fields (compose and the Helm chart set these): the URL is built here,
    # once, with every part percent-quoted, so a password may hold any character (`@ / : + %`).
    db_host: str | None = Field(
        default=None, description="PostgreSQL host; set = build database_url from NCP_DB_*"
    )
    db_port: int = 5432
    db_user: str = "ncp"
    db_password: str | None = Field(default=None, description="PostgreSQL password (with NCP_DB_HOST)")
    db_name: str = "ncp"
    broker_url: str | None = Field(
        default=None, description="Celery broker; default: SQLite-backed kombu transport under NCP_HOME"
    )

    # --- API ---------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str | None = Field(default=None, description="Where clients (CLI) reach the API")
    api_token: str | None = Field(default=None, description="Bearer token; unset = local-only API")
    api_allow_remote_without_token: bool = Field(
        default=False, description="Serve non-loopback clients without NCP_API_TOKEN (trusted networks only)"
    )

    # --- workers -----------------------------------------------------------------------------
    worker_queues: str = Field(default="data,train,eval", description="Comma list of queues to consume")
    gpus: str = Field(default="", description="GPU ids this train worker owns, e.g. '0,1'; '' = all/none")
    nproc_per_node: int = Field(default=0, description="torchrun processes; 0 = one per GPU (1 on CPU)")
    max_attempts: int = Field(default=3, description="Attempts before the reconciler fails a job")
    lease_seconds: int = Field(default=120, description="Worker lease TTL; renewed by heartbeat")
    cancel_grace_seconds: float = Field(default=20.0, description="Cooperative stop -> SIGTERM -> SIGKILL")
    reconcile_interval_seconds: float = 15.0
    visibility_timeout_seconds: int = Field(
        default=6 * 3600, description="Broker redelivery delay for unacked tasks; > any stage step"
    )

    # --- inference ---------------------------------------------------------------------------
    inference_engine: Literal["auto", "vllm", "native"] = "auto"
    inference_host: str = "127.0.0.1"
    inference_port: int = 8001
    inference_url: str | None = Field(default=None, description="Where the API/CLI reach the model server")
    inference_api_key: str | None = Field(
        default=None,
        description="Key chat clients send (Authorization: Bearer); vLLM's --api-key. Unset: loopback clients only",
    )
    vllm_python: str | None = Field(
        default=None, description="Python of a virtualenv with vLLM (it pins its own torch)"
    )
    vllm_gpu_memory_utilization: float | None = Field(
        default=None,
        description="vLLM --gpu-memory-utilization; unset: vLLM's default on a GPU, a KV-cache size on CPU",
    )
    vllm_max_model_len: int | None = None
    vllm_dtype: str = Field(default="auto", description="vLLM --dtype (auto = config.json's torch_dtype)")
    vllm_extra_args: str = Field(
        default="", description="Extra vLLM server flags, shell-split (e.g. --enforce-eager)"
    )

    # --- Kubernetes multi-node training (services/train_worker/k8s.py) ------------------------
    k8s_api_url: str = Field(
        default="https://kubernetes.default.svc", description="Kubernetes API server the train worker calls"
    )
    k8s_namespace: str = Field(default="", description="Namespace for training Jobs; '' = the pod's own")
    k8s_train_image: str = Field(default="", description="Image of multi-node training pods; '' = disabled")
    k8s_gpu_resource: str = Field(default="amd.com/gpu", description="Extended resource name of one GPU")
    k8s_checkpoint_claim: str = Field(default="", description="PVC mounted at NCP_HOME in training pods")
    k8s_config_map: str = Field(default="", description="ConfigMap of NCP_* env given to training pods")
    k8s_rdzv_port: int = Field(default=29500, description="torchrun c10d rendezvous port")

    # --- ROCm / CUDA process environment -----------------------------------------------------
    rocm_env_defaults: bool = Field(
        default=True, description="Apply the MI300X env defaults (docs/deploy.md)"
    )

    log_level: str = "INFO"

    @field_validator("api_token", "inference_api_key")
    @classmethod
    def _no_placeholder_token(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and (v.strip() == "" or v in PLACEHOLDER_SECRETS):
            raise ValueError(
                f"NCP_{str(info.field_name).upper()} is a placeholder or empty; set a real secret or unset it"
            )
        return v

    @field_validator("db_password")
    @classmethod
    def _no_placeholder_db_password(cls, v: str | None) -> str | None:
        if v is not None and (v == "" or v in PLACEHOLDER_SECRETS):
            raise ValueError(
                "NCP_DB_PASSWORD is a placeholder or empty; set POSTGRES_PASSWORD to a real secret"
            )
        return v

    @field_validator("api_port", "inference_port", "db_port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 < v < 65536:
            raise ValueError(f"port must be in 1..65535, got {v}")
        return v

    @field_validator("vllm_gpu_memory_utilization")
    @classmethod
    def _util(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        # Derived defaults live here, once, so every service computes them the same way.
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())
        if self.database_url is not None and self.db_host is not None:
            raise ValueError("set NCP_DATABASE_URL or NCP_DB_HOST (with NCP_DB_*), not both")
        if self.db_host is not None:
            object.__setattr__(self, "database_url", postgres_url(self))
        if self.database_url is None:
            object.__setattr__(self, "database_url", f"sqlite:///{self.home / 'registry.db'}")
        if self.broker_url is None:
            object.__setattr__(self, "broker_url", f"sqla+sqlite:///{self.home / 'broker.db'}")
        if self.api_url is None:
            object.__setattr__(self, "api_url", f"http://{self.api_host}:{self.api_port}")
        if self.inference_url is None:
            object.__setattr__(self, "inference_url", f"http://{self.inference_host}:{self.inference_port}")
        return self

    # Folders derived from home; the layout of a run folder is in shared/paths.py.
    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def serving_dir(self) -> Path:
        return self.home / "serving"

    @property
    def models_dir(self) -> Path:  # imported models (ncp import nanochat), one folder per name
        return self.home / "models"

    @property
    def inference_headers(self) -> dict[str, str]:
        """What a client of the model server sends: its key, when one is configured."""
        return {"Authorization": f"Bearer {self.inference_api_key}"} if self.inference_api_key else {}

    @property
    def queues(self) -> list[str]:
        return [q.strip() for q in self.worker_queues.split(",") if q.strip()]


def postgres_url(s: Settings) -> str:
    """The registry URL from the NCP_DB_* fields. Percent-quoting (not `+` for a space: SQLAlchemy
    unquotes with `unquote`) keeps `@ / : + % #` and spaces inside their part of the URL."""
    if not s.db_host:
        raise ValueError("NCP_DB_HOST is empty")
    if s.db_password is None:
        raise ValueError("NCP_DB_PASSWORD is not set (NCP_DB_HOST is)")
    host = f"[{s.db_host}]" if ":" in s.db_host else s.db_host  # an IPv6 literal
    user, password, name = (quote(x, safe="") for x in (s.db_user, s.db_password, s.db_name))
    return f"postgresql+psycopg://{user}:{password}@{host}:{s.db_port}/{name}"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Built on first use, not at import, so tests can set env vars and call `get_settings.cache_clear()`."""
    return Settings()
