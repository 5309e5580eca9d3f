"""The end-of-run table, report.md and plots, rebuilt from what the stages wrote."""

import json
from pathlib import Path

import pytest

from integration_training import report
from integration_training.stats import format_p, paired_p_value
from integration_training.evaluate import ProblemRecord, aggregate, eval_records_path, summary_path, write_records, write_summary


def write_eval(run_dir: Path, stage: str, step: int, per_problem_correct: list[list[int]]) -> dict[str, float]:
    """An evaluation as the evaluation stage writes it (records with scores + aggregates); returns its values."""
    k = len(per_problem_correct[0])
    records = [
        ProblemRecord(index=index, source="s", prompt=[{"role": "user", "content": f"problem {index}"}],
                      reference="1", reward="gsm8k", greedy="g", greedy_strict=float(samples[0]),
                      greedy_lenient=float(samples[0]), greedy_tokens=1, completions=["c"] * k,
                      strict=[float(x) for x in samples], lenient=[float(x) for x in samples], tokens=[1] * k)
        for index, samples in enumerate(per_problem_correct)
    ]
    result = aggregate(records, k)
    values = result.summary(prefix="eval/")
    write_records(result, eval_records_path(run_dir, stage, step))
    write_summary(result, summary_path(run_dir, stage, step), stage, step, values)
    return values


def write_metrics(run_dir: Path) -> None:
    rows = [{"stage": "sft", "step": s, "loss": 2.0 / s} for s in range(1, 6)]
    rows += [{"stage": "sft", "step": 5, "val_loss": 0.5}]
    rows += [{"stage": "rl", "step": s, "reward": 0.1 * s, "response_tokens": 20 + s} for s in range(1, 4)]
    rows += [{"stage": "rl", "step": 2, "eval/pass@1_strict": 0.4, "eval/pass@4_strict": 0.6}]
    rows += [{"stage": "eval", "step": 3, "evaluated": "rl", "eval/pass@1_strict": 0.5, "eval/pass@4_strict": 0.7}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_orders_stages_and_tests_each_improvement(tmp_path):
    n = 60
    write_eval(tmp_path, "baseline", 0, [[0, 0, 0, 0]] * n)
    write_eval(tmp_path, "sft", 7, [[1, 0, 0, 0]] * n)  # after SFT: 25% sampled
    write_eval(tmp_path, "rl", 3, [[1, 1, 1, 0]] * n)  # after RL: 75% sampled
    write_metrics(tmp_path)
    table = report.write_report(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "after SFT", "after RL"]
    assert "0.250" in rows[1] and "0.750" in rows[2] and "(4 samples/problem)" in table
    # 60 problems all gained: below what 20 000 permutations resolve, printed as a bound rather than 0.0000.
    assert rows[2].rstrip(" |").endswith("< 0.0001") and "0.0000" not in table
    text = (tmp_path / "report.md").read_text()
    assert table in text  # the report shows exactly the printed numbers
    assert "Wilson" in text and "fraction per problem" in text and "conservative" in text  # which interval, why
    for plot in ("sft_loss", "rl_reward", "rl_pass_at_k", "rl_response_length"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in text


def test_p_values_below_the_resolution_are_a_bound():
    assert [format_p(p) for p in (0.5, 0.01234, 0.0001, 0.00005, 0.0)] == [
        "0.5000", "0.0123", "0.0001", "< 0.0001", "< 0.0001"]


def test_rl_only_run_compares_its_baseline_with_after_rl(tmp_path):
    write_eval(tmp_path, "baseline", 0, [[0, 1]] * 10)  # mode "rl": the baseline is the source checkpoint
    write_eval(tmp_path, "rl", 2, [[1, 0]] * 10)  # an evaluation during RL (evaluation.every_rl_steps)
    write_eval(tmp_path, "rl", 5, [[1, 1]] * 10)
    evaluations = report.stage_evaluations(tmp_path)
    assert [(e.label, e.path.name) for e in evaluations] == [
        ("baseline", "baseline_step_000000.jsonl"), ("after RL", "rl_step_000005.jsonl")]


def test_evaluations_of_different_problems_are_refused(tmp_path):
    write_eval(tmp_path, "baseline", 0, [[0, 0]] * 5)
    write_eval(tmp_path, "sft", 3, [[0, 0]] * 6)
    with pytest.raises(AssertionError, match="other problems"):
        report.stage_evaluations(tmp_path)


def test_report_prints_what_evaluation_wrote_and_recomputes_nothing(tmp_path):
    """Every cell is the evaluation's aggregate: change the saved aggregates and the table follows them."""
    write_eval(tmp_path, "baseline", 0, [[0, 0, 0]] * 9 + [[1, 1, 1]])
    path = summary_path(tmp_path, "baseline", 0)
    summary = json.loads(path.read_text())
    summary["metrics"]["pass@1_strict"] = {"value": 0.123, "low": 0.045, "high": 0.678}
    path.write_text(json.dumps(summary))
    row = report.format_table(report.comparison_rows(report.stage_evaluations(tmp_path))).splitlines()[-1]
    assert "| 0.123 [0.04, 0.68] |" in row and "| 0.100 [" in row  # pass@1 strict as saved; greedy as computed


def test_paired_p_compares_the_recorded_per_problem_scores(tmp_path):
    write_eval(tmp_path, "baseline", 0, [[0, 0, 0]] * 30)
    write_eval(tmp_path, "sft", 1, [[1, 0, 0]] * 30)
    before, after = report.stage_evaluations(tmp_path)
    assert before.paired_scores == [0.0] * 30 and after.paired_scores == pytest.approx([1 / 3] * 30)
    p = report.comparison_rows([before, after])[1]["p_vs_previous"]
    assert p == paired_p_value(before.paired_scores, after.paired_scores) < 1e-4


def test_one_sample_per_problem_is_named_in_the_singular(tmp_path):
    write_eval(tmp_path, "baseline", 0, [[0]] * 5)
    write_eval(tmp_path, "sft", 7, [[1]] * 5)
    write_metrics(tmp_path)
    table = report.write_report(tmp_path)
    assert "(1 sample/problem)" in table and "1 samples" not in table
