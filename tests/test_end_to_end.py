"""README's main command, `python deploy.py CONFIG`, run end to end in one process on a tiny model.

Checks what a run leaves (every artefact the README promises) and the SFT → RL hand-off: RL's first policy is
SFT's last checkpoint, weight for weight; `mode="rl"` starts from `output.source_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_config
from integration_training import cli, rl
from integration_training.config import Config, to_json

PLOTS = ("sft_loss.png", "rl_reward.png", "rl_pass_at_k.png", "rl_response_length.png")


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """Order-independent digest of float32 weights (the safetensors file may hold fewer keys: tied/buffers)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class PolicyLoads:
    """Wraps rl.load_policy: records (what was asked for, hash of the weights actually loaded) per call."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, dict[str, torch.Tensor]]] = []
        original = rl.load_policy

        def recording(init_model, *args, **kwargs):
            model, tokenizer = original(init_model, *args, **kwargs)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.calls.append((str(init_model), state))
            return model, tokenizer

        monkeypatch.setattr(rl, "load_policy", recording)

    def hash_of(self, index: int, keys) -> str:
        _, state = self.calls[index]
        return weights_hash({k: state[k] for k in keys})


def write_config(path: Path, config: Config) -> Path:
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n")
    return path


def tiny_run_config(tmp_path: Path, **output) -> Config:
    return make_config(
        tmp_path,
        sft=dict(num_iterations=3, checkpoint_every=2, eval_every=2),
        rl=dict(num_iterations=2, checkpoint_every=2, sampling=dict(max_new_tokens=4)),
        evaluation=dict(every_rl_steps=2, num_problems=3, num_samples=2, sampling=dict(max_new_tokens=4)),
        output=dict(experiment_name="e2e", **output),
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_deploy_sft_then_rl_leaves_every_artefact_and_hands_sft_weights_to_rl(tmp_path, monkeypatch, capsys):
    config = tiny_run_config(tmp_path, mode="sft+rl", source_checkpoint=None)
    loads = PolicyLoads(monkeypatch)
    assert cli.main([str(write_config(tmp_path / "run.py", config))]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "results" / "e2e"

    # The hand-off: RL's first policy (the last load; the baseline eval loaded model.name before SFT) is SFT's
    # final checkpoint, weight for weight, and differs from the untrained model.
    sft_final = run / "checkpoints" / "sft" / "step_000003"
    assert sorted(p.name for p in (run / "checkpoints" / "sft").iterdir()) == ["step_000002", "step_000003"]
    saved = load_file(str(sft_final / "model.safetensors"))
    assert loads.calls[0][0] == config.model.name  # baseline eval
    assert loads.calls[-1][0] == str(sft_final)
    assert loads.hash_of(-1, saved) == weights_hash(saved)
    assert loads.hash_of(0, saved) != weights_hash(saved), "SFT did not change the weights"

    # Evaluations: baseline before SFT, RL's start (= after SFT) and end, all on the same problems.
    eval_dir = run / "eval"
    assert sorted(p.name for p in eval_dir.glob("*.jsonl")) == [
        "baseline_step_000000.jsonl", "rl_step_000000.jsonl", "rl_step_000002.jsonl"]
    prompts = {name: [json.loads(line)["prompt"] for line in (eval_dir / name).read_text().splitlines()]
               for name in ("baseline_step_000000.jsonl", "rl_step_000002.jsonl")}
    assert len(prompts["baseline_step_000000.jsonl"]) == 3 and len(set(map(json.dumps, prompts.values()))) == 1

    assert sorted(p.name for p in (run / "checkpoints" / "rl").iterdir()) == ["step_000002"]
    assert json.loads((run / "config.json").read_text()) == json.loads(to_json(config))
    assert "SFT" in (run / "train.log").read_text()

    phases = [json.loads(line)["phase"] for line in (run / "timings.jsonl").read_text().splitlines()]
    assert phases == ["baseline evaluation", "SFT", "RL (with its evaluations)"]

    report = (run / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| ") and "problems" not in line]
    assert [row.split("|")[1].strip() for row in table_rows] == ["baseline", "after SFT", "after RL"]
    assert all(row.split("|")[2].strip() == "3" for row in table_rows)  # problems per row = eval_examples
    for phase in phases:
        assert f"- {phase}: " in report
    for plot in PLOTS:
        assert (run / "plots" / plot).stat().st_size > 1000 and f"(plots/{plot})" in report
    assert table_rows[0] in out and f"report: {run / 'report.md'}" in out  # the table is printed too


def test_deploy_mode_rl_starts_from_source_checkpoint(tmp_path, monkeypatch):
    # A source checkpoint that is not model.name's weights: a copy of the tiny model with perturbed weights.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_config(tmp_path)
    source = tmp_path / "source_model"
    model = AutoModelForCausalLM.from_pretrained(base.model.name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(str(source))
    AutoTokenizer.from_pretrained(base.model.name).save_pretrained(str(source))

    config = tiny_run_config(tmp_path, mode="rl", source_checkpoint=str(source))
    loads = PolicyLoads(monkeypatch)
    assert cli.main([str(write_config(tmp_path / "run.py", config))]) == 0
    run = tmp_path / "results" / "e2e"
    saved = load_file(str(source / "model.safetensors"))
    assert [c[0] for c in loads.calls] == [str(source)]
    assert loads.hash_of(0, saved) == weights_hash(saved)
    assert not (run / "checkpoints" / "sft").exists()
    assert (run / "checkpoints" / "rl" / "step_000002" / "model.safetensors").is_file()
    report = (run / "report.md").read_text()
    assert "| RL start (source checkpoint) |" in report and "| after RL |" in report and "| baseline |" not in report
