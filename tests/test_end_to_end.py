"""README's main command, `python deploy.py CONFIG`, run end to end in one process on a tiny model.

Checks what a run leaves (every artefact the README promises) and the SFT → RL hand-off: RL's first policy is
SFT's last checkpoint, weight for weight; `mode="rl"` starts from `output.source_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_config
from integration_training import cli, models, rl
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
    """Wraps models.load_policy (the evaluation stage's loads and RL's): records (what was asked for, the weights
    actually loaded) per call, and whether it was a training load (RL's policy) or an evaluation's."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, dict[str, torch.Tensor]]] = []
        self.training: list[bool] = []
        original = models.load_policy

        def recording(init_model, *args, **kwargs):
            model, tokenizer = original(init_model, *args, **kwargs)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.calls.append((str(init_model), state))
            self.training.append(kwargs["training"])
            return model, tokenizer

        monkeypatch.setattr(models, "load_policy", recording)  # evaluate.run calls models.load_policy
        monkeypatch.setattr(rl, "load_policy", recording)  # rl.py's own name for it

    def hash_of(self, index: int, keys) -> str:
        _, state = self.calls[index]
        return weights_hash({k: state[k] for k in keys})


def write_config(path: Path, config: Config) -> Path:
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n")
    return path


EVAL_PROBLEMS = 3


def tiny_run_config(tmp_path: Path, **output) -> Config:
    return make_config(
        tmp_path,
        sft=dict(num_iterations=3, checkpoint_every=2, eval_every=2),
        rl=dict(num_iterations=2, checkpoint_every=2, sampling=dict(max_new_tokens=4)),
        evaluation=dict(every_rl_steps=2 if output["mode"] != "sft" else 0, num_problems=EVAL_PROBLEMS, num_samples=2,
                        sampling=dict(max_new_tokens=4)),
        output=dict(experiment_name="e2e", **output),
    )


def table_rows(report: str) -> list[list[str]]:
    """The cells of report.md's comparison table, one list per model row."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in report.splitlines()
            if line.startswith("| ") and "problems" not in line]


EVALUATED = {"baseline": "baseline", "after SFT": "sft", "after RL": "rl"}


def assert_report_agrees_with_metrics(run: Path) -> None:
    """Each report row shows exactly the numbers metrics.jsonl's `eval` line of that evaluation holds."""
    from integration_training.metrics import read_metrics

    lines = read_metrics(run, "eval")
    rows = table_rows((run / "report.md").read_text())
    assert rows and len(lines) == len(rows), (rows, lines)
    for row in rows:
        (line,) = [entry for entry in lines if entry["evaluated"] == EVALUATED[row[0]]]
        cells = [f"{line[f'eval/{n}']:.3f} [{line[f'eval/{n}_low']:.2f}, {line[f'eval/{n}_high']:.2f}]"
                 for n in ("pass@1_strict", "pass@1_lenient", "greedy_strict", "greedy_lenient")]
        assert row[1:6] == [str(line["eval/num_problems"]), *cells], (row, line)


def evaluation_prompts(config: Config) -> list[str]:
    """The prompts of the first evaluation.num_problems problems of evaluation.mixture."""
    from integration_training.problems import verified_problems

    problems = verified_problems(config.evaluation.mixture, config.data.shuffle_seed, "evaluation.mixture")
    return [json.dumps([dict(m) for m in p.messages[:-1]]) for p in problems[: config.evaluation.num_problems]]


def record_prompts(path: Path) -> list[str]:
    return [json.dumps(json.loads(line)["prompt"]) for line in path.read_text().splitlines()]


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

    # The hand-off: RL's policy (its one training load) is SFT's final checkpoint, weight for weight, and differs
    # from the untrained model the baseline evaluation loaded.
    sft_final = run / "checkpoints" / "sft" / "step_000003"
    rl_final = run / "checkpoints" / "rl" / "step_000002"
    assert sorted(p.name for p in (run / "checkpoints" / "sft").iterdir()) == ["step_000002", "step_000003"]
    saved = load_file(str(sft_final / "model.safetensors"))
    assert [c[0] for c in loads.calls] == [config.model.name, str(sft_final), str(sft_final), str(rl_final)]
    assert loads.training == [False, False, True, False]  # baseline, after SFT, RL's policy, after RL
    assert loads.hash_of(2, saved) == weights_hash(saved)
    assert loads.hash_of(0, saved) != weights_hash(saved), "SFT did not change the weights"

    # Evaluations: baseline before SFT, after SFT, after RL, all on the evaluation mixture's first problems.
    eval_dir = run / "eval"
    names = ["baseline_step_000000", "rl_step_000002", "sft_step_000003"]
    assert sorted(p.name for p in eval_dir.glob("*.jsonl")) == [f"{n}.jsonl" for n in names]
    assert sorted(p.name for p in eval_dir.glob("*.json")) == [f"{n}.json" for n in names]
    for name in names:
        assert record_prompts(eval_dir / f"{name}.jsonl") == evaluation_prompts(config)

    assert sorted(p.name for p in (run / "checkpoints" / "rl").iterdir()) == ["step_000002"]
    assert json.loads((run / "config.json").read_text()) == json.loads(to_json(config))
    assert "SFT" in (run / "train.log").read_text()

    phases = [json.loads(line)["phase"] for line in (run / "timings.jsonl").read_text().splitlines()]
    assert phases == ["baseline evaluation", "SFT", "after-SFT evaluation", "RL (with its evaluations)",
                      "after-RL evaluation"]

    report = (run / "report.md").read_text()
    rows = table_rows(report)
    assert [row[0] for row in rows] == ["baseline", "after SFT", "after RL"]
    assert all(row[1] == str(EVAL_PROBLEMS) for row in rows)  # problems per row = evaluation.num_problems
    assert rows[0][6] == "—" and all(re.fullmatch(r"< 0\.0001|[01]\.\d{4}", row[6]) for row in rows[1:])
    assert_report_agrees_with_metrics(run)
    for phase in phases:
        assert f"- {phase}: " in report
    for plot in PLOTS:
        assert (run / "plots" / plot).stat().st_size > 1000 and f"(plots/{plot})" in report
    assert "| baseline |" in out and f"report: {run / 'report.md'}" in out  # the table is printed too


def test_deploy_sft_only_ends_with_the_baseline_and_after_sft_table(tmp_path, monkeypatch, capsys):
    """mode="sft": the same table as an SFT → RL run up to SFT — baseline vs after SFT on the evaluation mixture,
    with the paired p — from evaluation's own settings (no RL field involved)."""
    config = tiny_run_config(tmp_path, mode="sft", source_checkpoint=None)
    loads = PolicyLoads(monkeypatch)
    assert cli.main([str(write_config(tmp_path / "run.py", config))]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "results" / "e2e"
    sft_final = run / "checkpoints" / "sft" / "step_000003"
    assert [c[0] for c in loads.calls] == [config.model.name, str(sft_final)] and loads.training == [False, False]
    assert not (run / "checkpoints" / "rl").exists()
    for name in ("baseline_step_000000", "sft_step_000003"):
        records = [json.loads(line) for line in (run / "eval" / f"{name}.jsonl").read_text().splitlines()]
        assert record_prompts(run / "eval" / f"{name}.jsonl") == evaluation_prompts(config)
        assert all(len(r["strict"]) == config.evaluation.num_samples for r in records)
    rows = table_rows((run / "report.md").read_text())
    assert [row[0] for row in rows] == ["baseline", "after SFT"]
    assert [row[1] for row in rows] == [str(EVAL_PROBLEMS)] * 2
    assert rows[0][6] == "—" and re.fullmatch(r"< 0\.0001|[01]\.\d{4}", rows[1][6])
    assert "(2 samples/problem)" in (run / "report.md").read_text()
    assert_report_agrees_with_metrics(run)
    assert "| after SFT |" in out


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
    # The baseline is the source checkpoint (evaluated), then RL's policy loads it, then the after-RL evaluation.
    assert [c[0] for c in loads.calls] == [str(source), str(source), str(run / "checkpoints" / "rl" / "step_000002")]
    assert loads.training == [False, True, False]
    assert loads.hash_of(1, saved) == weights_hash(saved)
    assert not (run / "checkpoints" / "sft").exists()
    assert (run / "checkpoints" / "rl" / "step_000002" / "model.safetensors").is_file()
    report = (run / "report.md").read_text()
    assert [row[0] for row in table_rows(report)] == ["baseline", "after RL"]
    assert_report_agrees_with_metrics(run)


def test_evaluations_run_only_where_the_evaluation_section_asks(tmp_path, monkeypatch):
    """at_start / after_sft / after_rl off and every_rl_steps=1: only RL's own evaluations run (no model loaded
    for evaluation), and the report says the run holds none of the table's rows."""
    config = tiny_run_config(tmp_path, mode="sft+rl", source_checkpoint=None)
    config = dataclasses.replace(config, evaluation=dataclasses.replace(
        config.evaluation, at_start=False, after_sft=False, after_rl=False, every_rl_steps=1))
    loads = PolicyLoads(monkeypatch)
    assert cli.main([str(write_config(tmp_path / "run.py", config))]) == 0
    run = tmp_path / "results" / "e2e"
    assert loads.training == [True]  # RL's policy only
    assert sorted(p.name for p in (run / "eval").glob("*.jsonl")) == ["rl_step_000001.jsonl", "rl_step_000002.jsonl"]
    phases = [json.loads(line)["phase"] for line in (run / "timings.jsonl").read_text().splitlines()]
    assert phases == ["SFT", "RL (with its evaluations)"]
    from integration_training.metrics import read_metrics

    assert [r["step"] for r in read_metrics(run, "rl") if "eval/pass@1_strict" in r] == [1, 2]
    assert read_metrics(run, "eval") == []
    # The last RL evaluation is RL's final model: the table's after-RL row, alone.
    assert [row[0] for row in table_rows((run / "report.md").read_text())] == ["after RL"]
