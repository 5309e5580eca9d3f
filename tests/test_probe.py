"""`deploy.py CONFIG --dry-run --probe`: worst case measured per stage, OOM and over-long sequences → exit 2 + field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_config
from integration_training.config import to_json
from integration_training.probe import CAP_ENV

REPO = Path(__file__).resolve().parents[1]


def _deploy(tmp_path: Path, config, *args: str, cap_mb: float | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "cfg.py"
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop(CAP_ENV, None)
    if cap_mb is not None:
        env[CAP_ENV] = str(cap_mb)
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), str(path), *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def _assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: probe:") or last.startswith("error: data."), last
    for fragment in fragments:
        assert fragment in last, last


def test_probe_prints_every_stage_and_a_prediction(tmp_path):
    config = make_config(tmp_path, output={"mode": "sft+rl"})
    result = _deploy(tmp_path, config, "--dry-run", "--probe")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("sft step", "rl rollout", "rl train", "eval chunk"):
        assert re.search(rf"^  {stage} +\d+\.\d\d s/unit × +\d+\.\d = +\d+ s .*host peak RSS \d+\.\d\d GiB",
                         result.stdout, re.M), (stage, result.stdout[-2000:])
    low, total, high = None, None, None
    match = re.search(r"predicted time: (\d+) s \(interval (\d+)–(\d+) s; worst case (\d+) s\)", result.stdout)
    assert match, result.stdout[-2000:]
    total, low, high, worst = (int(match[i]) for i in (1, 2, 3, 4))
    assert low <= total <= worst <= high
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr, result.stderr[-2000:]
    assert not (Path(config.output.save_dir) / "test").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("mode,field", [
    pytest.param("sft+rl", "sft.batch_size", marks=pytest.mark.slow),  # 7 s; the rl case runs the same cap check
    ("rl", "rl.sampling.batch_size")])
def test_a_worst_case_over_the_memory_cap_fails_in_the_probe_naming_the_field(tmp_path, mode, field):
    """A 1 MiB cap: the first stage probed (worst case first: SFT's longest batch, else the RL rollout) fails."""
    source = str(tmp_path / "tiny_model") if mode == "rl" else None
    config = make_config(tmp_path, output={"mode": mode, "source_checkpoint": source})
    result = _deploy(tmp_path, config, "--dry-run", "--probe", cap_mb=1)
    _assert_user_error(result, "runs out of memory", field, CAP_ENV)


@pytest.mark.slow  # a third passing probe subprocess (~14 s); the cap is read by the 1 MiB tests above
def test_a_cap_above_the_measured_peak_passes(tmp_path):
    config = make_config(tmp_path, output={"mode": "sft"})
    result = _deploy(tmp_path, config, "--dry-run", "--probe", cap_mb=1e6)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sft step" in result.stdout and "eval chunk" in result.stdout


def test_a_sequence_longer_than_the_model_fails_in_the_probe(tmp_path):
    config = make_config(tmp_path, output={"mode": "sft"}, data={"max_length": 2048})  # tiny model: 1024 positions
    _assert_user_error(_deploy(tmp_path, config, "--dry-run", "--probe"), "data.max_length=2048", "1024")


def test_probe_before_a_run_lands_in_the_report(tmp_path):
    config = make_config(tmp_path, output={"mode": "sft"})
    result = _deploy(tmp_path, config, "--probe")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(config.output.save_dir) / config.output.experiment_name
    estimate = json.loads((run_dir / "estimate.json").read_text())
    assert estimate["stages"]["sft step"]["units"] == config.sft.num_iterations
    report = (run_dir / "report.md").read_text()
    assert re.search(r"\| SFT \| \d+ s \| \d+ s \|", report), report
    assert "predicted time:" in result.stderr


def test_plan_memory_line_is_within_30_percent_of_the_measured_peak_rss(tmp_path):
    """The plan's predicted peak (static + the largest stage's activations/KV cache + the process baseline) against
    the probe's measured peak RSS, which runs that very worst case."""
    from integration_training.plan import predicted_peak_bytes

    config = make_config(tmp_path, output={"mode": "sft+rl"}, sft={"batch_size": 4, "examples_per_step": 4},
                         data={"max_length": 512})
    result = _deploy(tmp_path, config, "--dry-run", "--probe")
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = predicted_peak_bytes(result.stdout)
    measured = max(float(g) for g in re.findall(r"host peak RSS (\d+\.\d+) GiB", result.stdout)) * 1024**3
    assert 0.7 * measured <= predicted <= 1.3 * measured, (predicted / 2**30, measured / 2**30)


@pytest.mark.parametrize("layers,hidden,intermediate,kv_dim,vocab", [(2, 64, 128, 32, 1000), (30, 576, 1536, 192, 49152),
                                                                   (24, 896, 4864, 128, 151936)])
def test_memory_terms_scale_as_they_should(layers, hidden, intermediate, kv_dim, vocab):
    from integration_training.plan import Shape, activation_bytes, kv_cache_bytes

    shape = Shape(layers, hidden, intermediate, kv_dim, vocab)
    full, checkpointed = (activation_bytes(shape, 4096, 1024, 2, c) for c in (False, True))
    assert checkpointed < full  # checkpointing keeps one layer's input per layer, recomputes the rest
    assert activation_bytes(shape, 8192, 1024, 2, False) - activation_bytes(shape, 4096, 1024, 2, False) > 0
    logits = activation_bytes(shape, 4096, 2048, 4, True) - activation_bytes(shape, 4096, 1024, 4, True)
    assert logits == 2 * 1024 * vocab * 4  # float32 logits + their gradient per extra scored token
    assert kv_cache_bytes(shape, 200, 256, 2) - kv_cache_bytes(shape, 100, 256, 2) == \
        2 * layers * 100 * 256 * kv_dim * 2 + 100 * vocab * 4 * 2


def test_host_peak_is_the_process_own_not_its_launchers():
    """Linux's ru_maxrss survives exec: a child of a big process would report the parent's size as its peak."""
    ballast = bytearray(600 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # resident, not just reserved
    code = "from integration_training.probe import host_peak_bytes; print(host_peak_bytes())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 500 * 1024 * 1024, int(result.stdout) / 2**20
    del ballast


@pytest.mark.slow
def test_plan_memory_line_is_within_30_percent_of_the_probe_peak_for_the_offline_smollm2_config(tmp_path):
    """The shipped offline default (SmolLM2-135M): the plan's predicted peak against the peak RSS of the probe,
    which runs the same worst cases (SFT's longest batch, an RL rollout and update, an evaluation chunk)."""
    import dataclasses
    import runpy

    from integration_training.plan import predicted_peak_bytes

    shipped = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "00_offline_cpu.py"))["config"]
    config = dataclasses.replace(shipped, output=dataclasses.replace(shipped.output, save_dir=tmp_path / "results"))
    result = _deploy(tmp_path, config, "--dry-run", "--probe")
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = predicted_peak_bytes(result.stdout)
    measured = max(float(g) for g in re.findall(r"host peak RSS (\d+\.\d+) GiB", result.stdout)) * 1024**3
    assert 0.7 * measured <= predicted <= 1.3 * measured, (predicted / 2**30, measured / 2**30)


def test_the_point_prediction_takes_each_stage_typical_share_and_the_worst_case_bounds_it():
    from integration_training.probe import Estimate, Stage

    stages = [Stage("rl rollout", 2.0, 10, True, None, 1), Stage("rl train", 4.0, 10, False, None, 1, typical=0.5)]
    estimate = Estimate(stages, fixed_seconds=6.0, wall_seconds=1.0, phases={})
    assert estimate.worst == 6.0 + 20.0 + 40.0
    assert estimate.total == 6.0 + 20.0 + 20.0  # the update at half its worst case, decoding at its worst
    low, high = estimate.interval
    assert low < estimate.total < estimate.worst < high
    assert estimate.to_json()["stages"]["rl train"] == {
        "seconds_per_unit": 4.0, "units": 10, "seconds": 20.0, "worst_seconds": 40.0, "typical": 0.5,
        "device_peak": None, "host_peak": 1}


@pytest.mark.parametrize("answers,max_new,expected", [(["a b", "a b c d"], 64, None), (["word " * 200], 16, 16.0),
                                                      ([], 24, 24.0)])
def test_typical_completion_is_the_reference_answers_mean_plus_end_of_turn_capped(answers, max_new, expected):
    from integration_training.data.types import Example
    from integration_training.probe import _layer_tokens, _typical_completion_tokens

    class Words:  # a tokenizer whose tokens are the words
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    examples = [Example(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": a}),
                        reference="1", reward=None, source="test") for a in answers]
    typical = _typical_completion_tokens(Words(), examples, max_new)
    assert typical == (expected if expected is not None else ((2 + 1) + (4 + 1)) / 2)
    # The update's share: the prompt once per group, every sample's completion.
    assert _layer_tokens(80, typical, 8) / _layer_tokens(80, max_new, 8) <= 1.0
    assert _layer_tokens(80, 40, 8) == 80 + 8 * 40


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("prefill,step,max_new,scale", [(2.0, 0.5, 64, 1.0), (7.0, 0.25, 200, 4.0),
                                                        (0.0, 1.0, 12, 1.0), (3.0, 0.1, 9, 2.5)])
def test_decode_extrapolation_scales_only_the_prefill(monkeypatch, prefill, step, max_new, scale):
    """A fake sampler on a fake clock: prefill seconds, then `step` seconds per decode forward, a progress call after
    each. Warm-up steps run slower (they are left out); the estimate is prefill × scale + step × (max_new − 1)."""
    from integration_training import probe

    clock = _FakeClock()
    monkeypatch.setattr(probe.time, "perf_counter", clock)

    def run(progress) -> None:
        clock.now += prefill
        for forward in range(max_new - 1):
            clock.now += step * (3.0 if forward < probe.PROBE_WARMUP_STEPS else 1.0)  # slow first steps
            progress(1.0)
        progress(0.0)  # the chunk's closing call

    expected = prefill * scale + step * (max_new - 1)
    # the first stamp holds the prefill and one (slow) warm-up forward: the estimate takes out one timed step only
    slow_first = 2.0 * step
    assert probe._decode_extrapolated(run, max_new, prefill_scale=scale) == pytest.approx(expected + slow_first * scale)


def test_a_sampler_too_short_to_time_is_scaled_whole(monkeypatch):
    from integration_training import probe

    clock = _FakeClock()
    monkeypatch.setattr(probe.time, "perf_counter", clock)

    def run(progress) -> None:
        clock.now += 3.0
        progress(1.0)

    assert probe._decode_extrapolated(run, 1, prefill_scale=4.0) == pytest.approx(12.0)
    with pytest.raises(AssertionError):
        probe._decode_extrapolated(run, 1, prefill_scale=0.5)


@pytest.mark.parametrize("chunk_prompts", [1, 2, 3, 4, 5, 7, 50, 199, 200, 250, 1000])
@pytest.mark.parametrize("rows_per_problem", [1, 2, 3, 9])
def test_eval_probe_shape_keeps_the_chunks_rows_on_a_quarter_of_its_prompts(chunk_prompts, rows_per_problem):
    from integration_training.probe import EVAL_PREFILL_SHARE, eval_probe_shape

    prompts, samples = eval_probe_shape(chunk_prompts, rows_per_problem)
    rows = chunk_prompts * rows_per_problem
    assert prompts == -(-chunk_prompts // EVAL_PREFILL_SHARE)  # ceil: the longest quarter, at least one
    assert rows <= prompts * samples < rows + prompts  # the chunk's rows, rounded up by less than a row per prompt
    assert samples >= rows_per_problem


def test_an_eval_chunk_smaller_than_one_problems_rows_counts_the_rows_it_timed(tmp_path):
    """greedy + 3 samples = 4 rows a problem, 2 rows per sampling forward: the sampler splits each problem in two
    chunks and the probe times the first, so a chunk is 2 rows (not 4) and an evaluation twice as many chunks."""
    from integration_training import models, probe
    from integration_training.distributed import init_distributed

    config = make_config(tmp_path, evaluation={"num_problems": 4, "num_samples": 3,
                                               "sampling": {"batch_size": 2, "max_new_tokens": 8}})
    tokenizer = models.load_tokenizer(config.model.name)
    _, stage = probe.probe_eval(config, init_distributed(config.target), tokenizer, config.model.name)
    assert stage.units == pytest.approx(probe._evaluations(config) * 4 * 4 / 2)


def test_eval_probe_samples_the_longest_prompts_and_scales_their_prefill(tmp_path, monkeypatch):
    """probe_eval hands the sampler the longest quarter of a chunk's prompts with the chunk's row count, and scales
    the prefill by the prompts left out (the decode batch and the KV cache are the chunk's)."""
    from integration_training import models, probe, rollout
    from integration_training.distributed import init_distributed
    from integration_training.problems import held_out_problems
    from integration_training.template import render_prompt

    config = make_config(tmp_path, evaluation={"num_problems": 8, "num_samples": 3,
                                               "sampling": {"batch_size": 32, "max_new_tokens": 8}})
    tokenizer = models.load_tokenizer(config.model.name)
    calls, scales = [], []
    real_sample, real_extrapolated = rollout.sample, probe._decode_extrapolated

    def recording_sample(model, prompts, *, num_samples, **kwargs):
        calls.append(([list(p) for p in prompts], num_samples))
        return real_sample(model, prompts, num_samples=num_samples, **kwargs)

    def recording_extrapolated(run, max_new_tokens, prefill_scale=1.0):
        scales.append(prefill_scale)
        return real_extrapolated(run, max_new_tokens, prefill_scale)

    monkeypatch.setattr(rollout, "sample", recording_sample)
    monkeypatch.setattr(probe, "_decode_extrapolated", recording_extrapolated)
    _, stage = probe.probe_eval(config, init_distributed(config.target), tokenizer, config.model.name)
    (prompts, samples), = calls
    every = sorted((render_prompt(tokenizer, list(e.messages[:-1])) for e in held_out_problems(config, tokenizer)),
                   key=len, reverse=True)
    chunk_prompts = 32 // 4  # batch_size // (greedy + 3 samples)
    assert len(prompts) == 2 and samples == 16  # a quarter of 8 prompts, 32 rows
    assert sorted(map(len, prompts), reverse=True) == [len(p) for p in every[:2]]
    assert scales == [chunk_prompts / 2]
    evaluations = 2  # at start and after SFT
    assert probe._evaluations(config) == evaluations
    assert stage.units == pytest.approx(evaluations * len(every) * 4 / 32)  # every evaluation's rows over a chunk's


def test_rl_update_is_timed_with_the_optimizer_state_already_made(tmp_path, monkeypatch):
    """Every RL step after the run's first holds the optimizer's moments during its forward/backward; the probe's
    measured micro-batch must too (its memory peak is the run's), so a one-row step runs before it."""
    from integration_training import models, probe
    from integration_training import rl as rl_module
    from integration_training.distributed import init_distributed

    config = make_config(tmp_path, output={"mode": "rl", "source_checkpoint": str(tmp_path / "tiny_model")},
                         rl={"examples_per_step": 2, "num_samples": 4, "batch_size": 4})
    seen = []
    real = rl_module.train_on_rows

    def recording(models_, optimization, rows, **kwargs):
        seen.append((len(rows), sum(len(s) for s in optimization.optimizer.state.values())))
        return real(models_, optimization, rows, **kwargs)

    monkeypatch.setattr(rl_module, "train_on_rows", recording)
    tokenizer = models.load_tokenizer(config.model.name)
    _, train = probe.probe_rl(config, init_distributed(config.target), tokenizer, config.model.name)
    assert [rows for rows, _ in seen] == [1, 4]
    assert seen[0][1] == 0 and seen[1][1] > 0, seen  # no moments before the one-row step, moments before the timed one
    assert train.units == config.rl.num_iterations
