"""The prepared GPU check runs on CPU with a tiny shape, so it cannot rot between the sessions lent a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ~70 s on 2 loaded cores (every section of the GPU check on CPU); it guards the benchmark script, not the product.
@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--profile", "tiny",
                             "--device", "cpu", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["tokens_per_row"] for row in report["sft"]] == [128, 256]
    assert all(row["tokens_per_s"] > 0 and row["attn"] == "sdpa" for row in report["sft"])
    variants = report["curves"]["variants"]
    assert variants["float32"]["drop"] > 0.1  # the copy task is learnable at the profile's LR
    assert variants["bf16_masters"]["drop_vs_float32"] >= 0.8
    assert [d["rows"] for d in report["rl"]["decode"]] == [16, 32, 32]
    assert report["rl"]["decode"][-1]["weights"] == "bf16 weights"
    assert [t["gradient_checkpointing"] for t in report["rl"]["train_step"]] == [False, True]
    assert all(abs(t["logprob_mismatch"]) < 0.1 for t in report["rl"]["train_step"])
