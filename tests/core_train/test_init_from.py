"""Pretraining started from another run's checkpoint (TrainConfig.init_checkpoint_dir, issue #13):
saved optimizer state as saved or resharded from 2 ranks, weights-only, refusals, and the run's
own checkpoints taking precedence over the init checkpoint."""

from __future__ import annotations

import pytest

from shared.nanochat.checkpoint import copy_checkpoint, load_checkpoint
from shared.nanochat.init_from import InitError, plan_init
from shared.nanochat.train import TrainConfig, train


@pytest.fixture
def source(tiny_config, tmp_path):
    """A 6-step run of the tiny model, and copies of its last checkpoint as 2 ranks' optimizer
    shards (what an 8-GPU upstream run looks like, scaled down) and weights-only."""
    src = tmp_path / "src"
    train(tiny_config(num_iterations=6, checkpoint_dir=src))
    copy_checkpoint(src, 6, tmp_path / "two_ranks", world_size=2)
    copy_checkpoint(src, 6, tmp_path / "weights", with_optimizer=False)
    return tmp_path


def test_saved_optimizer_resharded_from_two_ranks_continues_like_the_one_rank_state(tiny_config, source):
    as_saved = train(
        tiny_config(num_iterations=3, checkpoint_dir=source / "a", init_checkpoint_dir=str(source / "src"))
    )
    resharded = train(
        tiny_config(
            num_iterations=3, checkpoint_dir=source / "b", init_checkpoint_dir=str(source / "two_ranks")
        )
    )
    # The 2-rank shards rebuild exactly the 1-rank state: the same losses, bit for bit.
    assert as_saved.start_step == 0 and as_saved.losses == resharded.losses
    meta = load_checkpoint(source / "b", 3)[2]
    assert meta["init"]["resharded"] and meta["init"]["step"] == 6
    assert meta["init"]["loaded"] == "weights + optimizer state resharded 2 -> 1 ranks"
    fresh = train(
        tiny_config(
            num_iterations=3,
            checkpoint_dir=source / "c",
            init_checkpoint_dir=str(source / "weights"),
            resume_optimizer="fresh",
        )
    )
    assert load_checkpoint(source / "c", 3)[2]["init"]["loaded"] == "weights only, fresh optimizer"
    assert fresh.losses[0] == pytest.approx(as_saved.losses[0], abs=1e-5)  # same weights, same batch
    assert fresh.losses[1:] != as_saved.losses[1:]  # the moments made a difference after one step
    scratch = train(tiny_config(num_iterations=3, checkpoint_dir=source / "d"))
    assert as_saved.losses[0] < scratch.losses[0] - 0.05  # it did start from the trained weights


def test_saved_without_optimizer_state_is_refused_before_training(tiny_config, source):
    cfg = tiny_config(
        num_iterations=3, checkpoint_dir=source / "x", init_checkpoint_dir=str(source / "weights")
    )
    with pytest.raises(InitError, match=r"no optimizer state .* resume\.optimizer=fresh"):
        train(cfg)
    assert not (source / "x").exists()  # nothing was trained or saved
    assert plan_init(source / "weights", None, "fresh", 1).describe() == "weights only, fresh optimizer"
    with pytest.raises(InitError, match="no complete checkpoint"):
        plan_init(source / "nowhere", None, "saved", 1)


def test_own_checkpoint_wins_over_init(tiny_config, source):
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    from shared.nanochat.train import TrainHooks

    cfg = tiny_config(
        num_iterations=4, checkpoint_dir=source / "own", init_checkpoint_dir=str(source / "two_ranks")
    )
    first = train(cfg, TrainHooks(should_stop=stop_after_two))
    assert first.stopped and first.checkpoint_step == 2
    second = train(cfg)  # a crashed continuation resumes itself, not the init checkpoint again
    assert second.start_step == 2 and second.step == 4
    uninterrupted = train(
        tiny_config(
            num_iterations=4, checkpoint_dir=source / "whole", init_checkpoint_dir=str(source / "two_ranks")
        )
    )
    assert first.losses + second.losses == uninterrupted.losses
    assert load_checkpoint(source / "own", 4)[2]["init"]["step"] == 6  # lineage survives the resume


def test_init_of_another_shape_is_refused(tiny_config, source):
    cfg = tiny_config(
        num_iterations=2,
        checkpoint_dir=source / "y",
        init_checkpoint_dir=str(source / "src"),
        aspect_ratio=64,
    )
    with pytest.raises(ValueError, match="init_checkpoint_dir: .* holds a different model"):
        train(cfg)


@pytest.mark.parametrize(
    ("field", "value"),
    [("init_step", -1), ("init_step", 3), ("resume_optimizer", "old"), ("init_checkpoint_dir", "")],
)
def test_init_config_fields_are_validated_by_name(field, value):
    kw = {"data_dir": "d", "tokenizer_dir": "t", "checkpoint_dir": "c", field: value}
    if field == "init_step" and value == 3:
        kw.pop("init_checkpoint_dir", None)  # a step of no run
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)
