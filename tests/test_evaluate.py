"""Evaluation harness: pass@k maths, aggregation with intervals, records, ARC letter logits, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, SHARED_DATA, smollm2_tokenizer, tiny_model, write_gsm8k_like
from integration_training.template import render_prompt
from integration_training.data import Example
from integration_training.evaluate import (
    ProblemRecord,
    Scoring,
    aggregate,
    eval_records_path,
    evaluate,
    write_records,
)
from integration_training.stats import pass_at_k, wilson_interval

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))


def _record(index: int, strict: list[float], lenient: list[float], greedy: float, letter: float | None = None):
    return ProblemRecord(index=index, source="s", prompt=[{"role": "user", "content": "q"}], reference="1",
                         reward="gsm8k", greedy="g", greedy_strict=greedy, greedy_lenient=greedy, greedy_tokens=3,
                         completions=["c"] * len(strict), strict=strict, lenient=lenient, tokens=[2] * len(strict),
                         letter=None if letter is None else "A", letter_correct=letter)


def test_aggregate_by_hand() -> None:
    records = [
        _record(1, [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], 1.0),
        _record(0, [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], 0.0),
    ]
    result = aggregate(records, k=4)
    m = {name: iv.value for name, iv in result.metrics.items()}
    assert m["pass@1_strict"] == pytest.approx((0.25 + 0.0) / 2)
    assert m["pass@1_lenient"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["pass@4_strict"] == pytest.approx(0.5) and m["pass@4_lenient"] == pytest.approx(1.0)
    assert m["greedy_strict"] == pytest.approx(0.5)
    assert "letter_acc" not in m and result.mean_response_tokens == 2.0
    assert [p.index for p in result.problems] == [0, 1]
    assert all(iv.low <= iv.value <= iv.high for iv in result.metrics.values())
    # Each record carries its own scores; every aggregate is their mean with stats' one interval.
    assert result.problems[1].scores == {"greedy_strict": 1.0, "greedy_lenient": 1.0, "pass@1_strict": 0.25,
                                         "pass@1_lenient": 0.5, "pass@4_strict": 1.0, "pass@4_lenient": 1.0}
    for name, interval in result.metrics.items():
        assert interval == wilson_interval([p.scores[name] for p in result.problems]), name
    summary = result.summary("eval/")
    assert summary["eval/pass@4_strict"] == 0.5 and "eval/pass@4_strict_low" in summary


def _arithmetic(n: int) -> list[Example]:
    from integration_training.data.arithmetic import generate

    return generate("test", n, 0, "arithmetic/test", None)


def test_evaluate_tiny_model_writes_records(tmp_path: Path) -> None:
    tokenizer = smollm2_tokenizer()
    model = tiny_model(len(tokenizer), seed=0)
    examples = _arithmetic(3)
    scoring = Scoring(num_samples=3, max_new_tokens=5, temperature=1.0, top_k=0, batch_size=4, seed=0, greedy=True,
                      tools=())
    result = evaluate(model, tokenizer, examples, scoring)
    assert result.num_problems == 3 and result.k == 3
    assert all(len(p.completions) == 3 and max(p.tokens) <= 5 for p in result.problems)
    assert {"greedy_strict", "greedy_lenient", "pass@1_strict", "pass@3_strict", "pass@1_lenient",
            "pass@3_lenient"} == set(result.metrics)
    again = evaluate(model, tokenizer, examples, scoring)
    assert [p.completions for p in again.problems] == [p.completions for p in result.problems]  # seeded
    path = write_records(result, eval_records_path(tmp_path, "rl", 5))
    assert path.name == "rl_step_000005.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and {"prompt", "completions", "strict", "lenient", "greedy"} <= set(lines[0])


def test_arc_letter_logit_accuracy() -> None:
    """A model whose head favours the token "C" after the prompt picks C; the reference decides correctness."""
    tokenizer = smollm2_tokenizer()
    model = tiny_model(len(tokenizer), seed=1)
    question = "Which is a gas?\n\nA. ice\nB. rock\nC. steam\nD. wood\n\nAnswer with the letter of the correct choice (A, B, C, D) only."
    messages = ({"role": "user", "content": question}, {"role": "assistant", "content": "C"})
    right = Example(messages=messages, reference="C", reward="arc", source="arc")
    wrong = Example(messages=messages, reference="B", reward="arc", source="arc")
    prompt = render_prompt(tokenizer, list(messages[:-1]))
    (c_token,) = tokenizer.encode("C", add_special_tokens=False)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight[c_token] = 50.0 * hidden / hidden.norm() ** 2
    result = evaluate(model, tokenizer, [right, wrong], Scoring(num_samples=1, max_new_tokens=1, temperature=1.0,
                                                                top_k=0, batch_size=2, seed=0, greedy=True, tools=()))
    assert [p.letter for p in result.problems] == ["C", "C"]
    assert result.metrics["letter_acc"].value == pytest.approx(0.5)
    assert result.problems[0].greedy_strict == 1.0  # greedy also answers C


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "integration_training.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _score_gsm8k_file(data: Path, rows: int, tmp_path: Path) -> None:
    """The CLI scores the first `rows` rows of a GSM8K-schema file, in order, with both scores printed."""
    out = tmp_path / "gsm8k.json"
    done = _cli("--model", "offline:SmolLM2-135M-Instruct", "--dataset", "openai/gsm8k", "--split", "test",
                "--subset", "main", "--path", str(data), "--max-samples", str(rows), "--k", "1",
                "--max-new-tokens", "48", "--batch-size", str(rows), "--seed", "0", "--no-greedy", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "pass@1_strict" in done.stdout and "pass@1_lenient" in done.stdout
    print(done.stdout)
    payload = json.loads(out.read_text())
    assert payload["num_problems"] == rows and len(payload["problems"]) == rows
    first = json.loads(data.read_text().splitlines()[0])
    assert payload["problems"][0]["prompt"][-1]["content"] == first["question"]  # the first rows, in order
    assert_metrics_match_records(payload)


def assert_metrics_match_records(payload: dict) -> None:
    """The reported pass@1/pass@k are the per-problem unbiased estimates averaged over the recorded samples."""
    k = payload["k"]
    for kind in ("strict", "lenient"):
        per_problem = [(len(p[kind]), sum(v > 0.5 for v in p[kind])) for p in payload["problems"]]
        for j in sorted({1, k}):
            expected = sum(pass_at_k(n, c, j) for n, c in per_problem) / len(per_problem)
            assert payload["metrics"][f"pass@{j}_{kind}"]["value"] == pytest.approx(expected), (kind, j)


def odd_length(completion: str, reference: str) -> float:
    """A reward that a random model earns about half the time (so the aggregates are not trivially 0)."""
    return float(len(completion) % 2)


def test_cli_scores_a_local_model_with_a_custom_reward(tmp_path: Path) -> None:
    """The eval CLI's success path on a fresh clone: a local tiny model, procedural problems, a module:function reward."""
    from helpers import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "integration_training.evaluate", "--model", str(model_dir), "--dataset", "arithmetic",
         "--split", "test", "--max-samples", "6", "--reward", "test_evaluate:odd_length", "--k", "3",
         "--max-new-tokens", "6", "--batch-size", "8", "--seed", "0", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    assert payload["num_problems"] == 6 and payload["k"] == 3
    assert all(len(p["completions"]) == 3 and p["greedy"] is not None for p in payload["problems"])
    for p in payload["problems"]:
        assert p["strict"] == [odd_length(c, p["reference"]) for c in p["completions"]]
    assert 0 < sum(sum(p["strict"]) for p in payload["problems"]) < 18  # both outcomes occur: the check below bites
    assert_metrics_match_records(payload)
    assert "pass@3_strict" in done.stdout


@pytest.mark.slow
def test_cli_scores_offline_smollm2_on_gsm8k_schema_rows(tmp_path: Path) -> None:
    """Runs in a fresh clone: rows we wrote in GSM8K's schema (question / answer with `#### N`)."""
    _score_gsm8k_file(write_gsm8k_like(tmp_path / "test.jsonl", 24, seed=3), 16, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"the real GSM8K copy {GSM8K_TEST} is not present (team-only; "
                    "the schema is covered by test_cli_scores_offline_smollm2_on_gsm8k_schema_rows)")
def test_cli_scores_offline_smollm2_on_gsm8k(tmp_path: Path) -> None:
    _score_gsm8k_file(GSM8K_TEST, 50, tmp_path)


def test_cli_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    done = _cli("--model", "offline:SmolLM2-135M-Instruct", "--dataset", "openai/gsm8k", "--split", "test",
                "--path", str(tmp_path / "missing.jsonl"), "--max-samples", "5")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "missing.jsonl" in done.stderr
