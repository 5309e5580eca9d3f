"""The stage scaffold shared by SFT and RL (`integration_training/stage.py`) and the stop agreement it relies on.

Through deploy.py, the scaffold's behaviour is shown in tests/test_faults.py (signals, NaN, resume) and the stage
tests; here: the pieces at unit level — the stop agreement across ranks (the two-rank Ctrl-C race), the layout
check of a resume, the overwrite refusal, and the optimizer step that no rank applies when it is non-finite.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from helpers import optimization, tiny_model

from integration_training import checkpoint, distributed
from integration_training.errors import UserError
from integration_training.signals import StopRequest
from integration_training.stage import Layout, RNGState, refuse_overwrite

ONE = distributed.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
TWO = dataclasses.replace(ONE, rank=1, world_size=2, is_main=False)


# ---------------------------------------------------------------------------------------------------- stop


def other_rank_requested(monkeypatch, reason: str | None) -> None:
    """Simulate rank 0 of two: it saw a stop request (with `reason`) or none (None); this process is rank 1."""
    monkeypatch.setattr(distributed, "any_rank", lambda flag, dist: flag or reason is not None)
    monkeypatch.setattr(distributed, "all_gather_objects",
                        lambda items, dist: ([reason] if reason is not None else []) + list(items))


def test_a_rank_that_polled_before_the_stop_file_appeared_stops_with_the_others(tmp_path, monkeypatch):
    """The race behind the flaky two-rank Ctrl-C test: rank 0 sees the stop file, rank 1 polled just before it
    appeared. Both must stop at this step boundary with the same reason (one message line), and rank 1's loop may
    mark the stop like rank 0's."""
    mine = StopRequest(tmp_path / "stop")
    assert not mine.requested  # the file is not there yet when this rank polls
    (tmp_path / "stop").write_text("SIGINT")  # ... and appears before the other rank polls
    other_rank_requested(monkeypatch, "SIGINT")
    assert mine.agree(TWO)
    assert mine.requested and mine.reason == "SIGINT"
    mine.mark_stopped("SFT step 1/4")  # asserted a recorded request: this is what failed once in three CI runs
    assert mine.stopped_at == "SFT step 1/4"


@pytest.mark.parametrize("mine_reason, other_reason, expected", [
    (None, None, None), ("SIGTERM", None, "SIGTERM"), (None, "stop file", "stop file"), ("SIGTERM", "SIGINT", "SIGINT"),
])
def test_every_rank_gets_the_same_answer_and_the_first_requesting_ranks_reason(monkeypatch, mine_reason,
                                                                               other_reason, expected):
    mine = StopRequest()
    if mine_reason is not None:
        mine.request(mine_reason)
    other_rank_requested(monkeypatch, other_reason)
    assert mine.agree(TWO) is (expected is not None)
    assert mine.reason == expected


def test_one_process_agrees_with_itself_without_collectives(monkeypatch):
    monkeypatch.setattr(distributed, "any_rank", lambda *_: pytest.fail("no collective for one process"))
    stop = StopRequest()
    assert not stop.agree(ONE)
    stop.request("SIGTERM")
    assert stop.agree(ONE) and stop.reason == "SIGTERM"


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_refuses_another_layout_naming_each_value():
    layout = Layout(world_size=2, parallelism="fsdp2", examples_per_step=8, per_step_field="rl.examples_per_step")
    layout.check(layout.state_dict(), Path("step_000001"))
    for other in (dataclasses.replace(layout, world_size=1), dataclasses.replace(layout, parallelism="ddp"),
                  dataclasses.replace(layout, examples_per_step=4)):
        with pytest.raises(UserError, match="world_size.*rl.examples_per_step") as info:
            layout.check(other.state_dict(), Path("step_000001"))
        assert "step_000001" in str(info.value)


def test_rng_component_round_trips():
    state = RNGState().state_dict()
    first = torch.rand(3)
    RNGState().load_state_dict(state)
    assert torch.equal(torch.rand(3), first)


def test_a_run_with_checkpoints_is_not_overwritten_without_resume(tmp_path):
    stage_dir = tmp_path / "checkpoints" / "sft"
    refuse_overwrite(tmp_path, [stage_dir], resume=False)  # nothing there yet
    model = tiny_model(40, 0)
    checkpoint.save_checkpoint(stage_dir, 2, model, None, {"step": 2}, state_dict=None, dtype="float32")
    with pytest.raises(UserError, match="already holds checkpoints.*--resume"):
        refuse_overwrite(tmp_path, [stage_dir], resume=False)
    refuse_overwrite(tmp_path, [stage_dir], resume=True)


# ---------------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_update_is_not_applied_and_is_reported(poison):
    model = tiny_model(40, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for group in optimizer.param_groups:
        group["base_lr"] = 0.1
    steps = optimization(optimizer, grad_clip=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(8)[None] % 40
    loss = model(input_ids=ids, labels=ids).loss
    if poison == "gradient":
        loss = loss * torch.tensor(float("inf"))
    steps.backward(loss)
    outcome = steps.step(float("nan") if poison == "loss" else float(loss.detach().clamp(max=1.0)))
    assert outcome.diverged and not outcome.overflow
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "nothing applied"
    assert all(p.grad is None for p in model.parameters()), "gradients cleared for the next step"
    assert not optimizer.state, "AdamW never stepped (no moments)"
    loss = model(input_ids=ids, labels=ids).loss
    steps.backward(loss)
    outcome = steps.step(float(loss.detach()))
    assert not outcome.diverged and math.isfinite(outcome.grad_norm)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_rollout_engine_imports_neither_the_config_nor_a_trainer():
    """rollout.py sees token ids and a SamplingSettings; the trainers build those from their config sections."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "integration_training" / "rollout.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    forbidden = {f"integration_training.{name}" for name in ("config", "sft", "rl", "stage", "cli", "evaluate")}
    assert not imported & forbidden, imported & forbidden
