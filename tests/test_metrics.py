"""metrics.jsonl writing, truncation for resume, rank gating, and offline wandb."""

from __future__ import annotations

import json
import math

import pytest

from integration_training.metrics import MetricsLogger, Progress, read_metrics


def logger_for(run_dir, stage="sft", is_main=True, use_wandb=False):
    return MetricsLogger(run_dir, stage, is_main, use_wandb, "proj", "exp", {"a": 1})


def test_log_appends_flushed_lines(tmp_path):
    log = logger_for(tmp_path)
    log.log(1, {"loss": 2.5, "nan": math.nan})
    assert read_metrics(tmp_path) == [{"stage": "sft", "step": 1, "loss": 2.5, "nan": "nan"}]  # flushed before close
    log.close()
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON, NaN spelled as a string


def test_truncate_after_drops_only_this_stages_later_steps(tmp_path):
    with logger_for(tmp_path, stage="sft") as sft:
        for step in range(1, 6):
            sft.log(step, {"loss": float(step)})
    with logger_for(tmp_path, stage="rl") as rl:
        rl.log(7, {"reward": 1.0})
    with logger_for(tmp_path, stage="sft") as sft:
        sft.truncate_after(3)
        sft.log(4, {"loss": 40.0})
    rows = read_metrics(tmp_path)
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("sft", 3), ("rl", 7), ("sft", 4)]
    assert read_metrics(tmp_path, "sft")[-1]["loss"] == 40.0


def test_non_main_rank_writes_nothing(tmp_path):
    with logger_for(tmp_path, is_main=False) as log:
        log.log(1, {"loss": 1.0})
        log.truncate_after(0)
    assert not (tmp_path / "metrics.jsonl").exists()
    progress = Progress(total=3, initial=0, is_main=False, description="x")
    progress.update({"loss": "1"})
    assert progress._bar is None  # no tqdm bar on other ranks


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with logger_for(tmp_path, use_wandb=True) as log:
        log.log(1, {"loss": 1.5})
        log.log(2, {"loss": 1.0, "text": "ignored by wandb"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "offline run directory with its .wandb log"
    run_id = (tmp_path / "wandb_sft_id.txt").read_text().strip()
    assert run_id in runs[0].name  # a resume reuses this id
    assert len(read_metrics(tmp_path)) == 2
