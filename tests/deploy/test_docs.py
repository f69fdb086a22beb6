"""docs/deploy.md: its POST /jobs example is a valid job spec, and the settings it names exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shared.jobs.spec import JobSpec
from tests.deploy.conftest import REPO, setting_env_names

DOC = (REPO / "docs" / "deploy.md").read_text()


def test_post_jobs_example_is_a_valid_spec():
    (body,) = re.findall(r"<<'JSON'\n(.*?)\nJSON\n", DOC, flags=re.S)
    spec = JobSpec.model_validate(
        json.loads(body), context={"roots": [Path("/data/ncp"), Path("/data/corpora")]}
    )
    assert spec.kind == "pipeline" and spec.model.depth == 24
    assert "POST http://127.0.0.1:8000/jobs" in DOC and "Authorization: Bearer $TOKEN" in DOC


def test_named_settings_exist():
    # NCP_E2E_*: knobs of scripts/e2e_compose.sh, not platform settings.
    named = {n for n in re.findall(r"\bNCP_[A-Z0-9_]+\b", DOC) if not n.startswith("NCP_E2E_")}
    assert named and named <= setting_env_names(), named - setting_env_names()


def test_rocm_settings_are_explained():
    for var in (
        "HIP_FORCE_DEV_KERNARG",
        "HSA_OVERRIDE_GFX_VERSION",
        "expandable_segments:True",
        "HIP_VISIBLE_DEVICES",
    ):
        assert f"`{var}" in DOC or f"{var}`" in DOC, var
