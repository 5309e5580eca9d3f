"""The end-of-run table, report.md and plots, rebuilt from what the stages wrote."""

import json
from pathlib import Path

import pytest

from integration_training import report


def write_eval(run_dir: Path, stage: str, step: int, per_problem_correct: list[list[int]]) -> None:
    path = run_dir / "eval" / f"{stage}_step_{step:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, samples in enumerate(per_problem_correct):
        record = {
            "index": index,
            "prompt": [{"role": "user", "content": f"problem {index}"}],
            "strict": [float(s) for s in samples],
            "lenient": [float(s) for s in samples],
            "greedy_strict": float(samples[0]),
            "greedy_lenient": float(samples[0]),
        }
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def write_metrics(run_dir: Path) -> None:
    rows = [{"stage": "sft", "step": s, "loss": 2.0 / s} for s in range(1, 6)]
    rows += [{"stage": "sft", "step": 5, "val_loss": 0.5}]
    rows += [{"stage": "rl", "step": s, "reward": 0.1 * s, "response_tokens": 20 + s} for s in range(1, 4)]
    rows += [{"stage": "rl", "step": 3, "eval/pass@1_strict": 0.4, "eval/pass@4_strict": 0.6}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.json").write_text(json.dumps({"rl": {}, "evaluation": {"num_samples": 4}}))


def test_table_orders_stages_and_tests_each_improvement(tmp_path):
    n = 60
    write_eval(tmp_path, "baseline", 0, [[0, 0, 0, 0]] * n)
    write_eval(tmp_path, "rl", 0, [[1, 0, 0, 0]] * n)  # after SFT: 25% sampled
    write_eval(tmp_path, "rl", 3, [[1, 1, 1, 0]] * n)  # after RL: 75% sampled
    write_metrics(tmp_path)
    table = report.write_report(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "after SFT", "after RL"]
    assert "0.250" in rows[1] and "0.750" in rows[2]
    # 60 problems all gained: below what 20 000 permutations resolve, printed as a bound rather than 0.0000.
    assert rows[2].rstrip(" |").endswith("< 0.0001") and "0.0000" not in table
    text = (tmp_path / "report.md").read_text()
    assert table in text  # the report shows exactly the printed numbers
    for plot in ("sft_loss", "rl_reward", "rl_pass_at_k", "rl_response_length"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in text


def test_paired_test_detects_a_real_gain_and_not_noise():
    before = [0.0] * 50 + [1.0] * 50
    better = [1.0 if i < 20 else b for i, b in enumerate(before)]  # 20 more problems solved, none lost
    assert report.paired_p_value(before, better) < 0.001
    assert report.paired_p_value(before, before) == 1.0
    swapped = before[25:] + before[:25]  # as many gained as lost: no evidence of a gain
    assert report.paired_p_value(before, swapped) > 0.05


def test_p_values_below_the_resolution_are_a_bound():
    assert [report.format_p(p) for p in (0.5, 0.01234, 0.0001, 0.00005, 0.0)] == [
        "0.5000", "0.0123", "0.0001", "< 0.0001", "< 0.0001"]


def test_rl_only_run_labels_its_start_as_the_source_checkpoint(tmp_path):
    write_eval(tmp_path, "rl", 0, [[0, 1]] * 10)
    write_eval(tmp_path, "rl", 5, [[1, 1]] * 10)
    labels = [c.label for c in report.stage_checkpoints(tmp_path)]
    assert labels == ["RL start (source checkpoint)", "after RL"]


def test_evaluations_of_different_problems_are_refused(tmp_path):
    write_eval(tmp_path, "baseline", 0, [[0, 0]] * 5)
    write_eval(tmp_path, "rl", 0, [[0, 0]] * 6)
    with pytest.raises(AssertionError, match="other problems"):
        report.stage_checkpoints(tmp_path)
