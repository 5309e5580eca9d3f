"""`deploy.py CONFIG --dry-run --probe`: measure the worst case of every stage before the run commits.

Loads the model on the configured device and runs, at the configuration's real shapes:
1. one SFT optimizer step on the longest micro-batch the SFT data produces (packed rows or the longest
   conversations), with the configured gradient accumulation;
2. one RL rollout of this rank's prompts × num_samples at worst-case length (no stop token: every row decodes
   rl.sampling.max_new_tokens; prefill and a few decode steps, extrapolated like 3.) and one micro-batch of the RL
   update at that length (every row trained: advantages ±1), timed and scaled to the micro-batches of a step;
3. the first decode steps of one evaluation chunk of evaluation.sampling.batch_size rows (greedy + num_samples
   samples per problem) with its KV cache allocated for the full length, extrapolated to max_new_tokens (a full
   500-row chunk is a minute on 2 CPU cores; the per-step cost is flat because the cache is pre-allocated). Its
   rows come from a quarter of the chunk's longest prompts with four times the samples each: the decode batch, the
   padded width and the cache are the chunk's, and the prefill (which runs once per distinct prompt, and was
   two thirds of this stage's probe time) is timed on a quarter of the prompts and scaled back up.
Worst case first: the stage that needs the most memory (SFT's longest batch, then RL) runs before anything else, so
an out-of-memory or an over-long sequence stops here with exit 2 and the field to change, not a hundred steps in.

Memory: device peak = torch.cuda.max_memory_allocated (reset per stage); host peak = the process's peak RSS so far
(`ru_maxrss`, monotonic). `INTEGRATION_TRAINING_PROBE_MEMORY_CAP_MB` simulates a smaller machine: a stage whose
peak (device on CUDA, host otherwise) exceeds it is treated exactly like an out-of-memory error (tests use it).

Multi-process: each rank probes its own shard's shapes (prompts per rank, its eval shard); the numbers printed
are the maximum over ranks (all_reduce_max), which is what the slowest / fullest rank sees. Under a single process
(what `--dry-run` runs today: the probe is not relaunched under torchrun) world size is 1, so a multi-process
config is probed at the per-rank shapes of rank 0 of its configured world size.

Prediction: stage time = measured seconds per unit × units in the run (steps, evaluations, model loads) × the
stage's typical share of its worst case. Decoding is predicted at its worst case (a chunk runs until its longest
row stops, and a sampled row at temperature 1 often runs long; at RL's row counts decode is memory-bound, so rows
that stop early barely shorten it). RL's update is predicted at the reference answers' mean length (what SFT
teaches), every row still trained (README has the offline default's predicted vs measured times). The interval's
low end lets decode stages finish at 60 % of max_new_tokens and the rest run 10 % faster; its high end is the
worst case + 10 % (timing noise, checkpoints, data rendering).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from integration_training.config import Config, runs_rl, runs_sft, world_size
from integration_training.errors import UserError

CAP_ENV = "INTEGRATION_TRAINING_PROBE_MEMORY_CAP_MB"
PROBE_WARMUP_STEPS = 3  # decode steps run untimed first (a fresh process is slow at new shapes)
PROBE_DECODE_STEPS = 4  # decode steps then timed (after prefill and warm-up); the rest is extrapolated
EVAL_PREFILL_SHARE = 4  # the eval chunk is probed with 1/EVAL_PREFILL_SHARE of its distinct prompts (see 3.)
EARLY_STOP_FRACTION = 0.6  # interval low end: decode stops at 60 % of max_new_tokens on average
NOISE = 0.1


@dataclass(frozen=True)
class Stage:
    name: str
    seconds_per_unit: float
    units: float  # how many times the run does it
    decode: bool  # decode-bound: rows stopping early make it faster (interval low end)
    device_peak: int | None  # bytes
    host_peak: int  # bytes
    typical: float = 1.0  # the typical run's share of the measured worst case (RL's update: shorter completions)

    @property
    def worst(self) -> float:
        return self.seconds_per_unit * self.units

    @property
    def total(self) -> float:
        return self.worst * self.typical


class _Enough(Exception):
    """Raised from the rollout's progress hook once the eval chunk has run enough decode steps."""


def host_peak_bytes() -> int:
    """This process's peak resident memory.

    Linux's `ru_maxrss` survives exec: a process started by a large parent (a test runner, a notebook) reports the
    parent's resident size at fork time as its own peak (measured: 2.05 GiB for a probe whose own peak is under
    1 GiB, launched from a pytest process). `VmHWM` belongs to the address space exec made, so it is read first.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; macOS bytes


def _memory_cap() -> int | None:
    value = os.environ.get(CAP_ENV)
    return None if not value else int(float(value) * 1024 * 1024)


def _fix_for(stage: str) -> str:
    return {
        "sft step": "lower sft.batch_size (raise the gradient accumulation instead), lower data.max_length, or set "
                    "model.gradient_checkpointing=True",
        "rl rollout": "lower rl.sampling.batch_size (rows per sampling forward) or rl.sampling.max_new_tokens",
        "rl train": "lower rl.batch_size or set model.gradient_checkpointing=True",
        "eval chunk": "lower evaluation.sampling.batch_size (rows per sampling forward) or evaluation.sampling.max_new_tokens",
    }[stage]


def _out_of_memory(stage: str, detail: str) -> UserError:
    return UserError(f"probe: {stage} runs out of memory ({detail}); {_fix_for(stage)}")


class _Measure:
    """Time one stage, reset and read its memory peaks, turn an OOM (real or simulated) into a UserError."""

    def __init__(self, device: torch.device, stage: str) -> None:
        self.device, self.stage = device, stage
        self.seconds, self.device_peak, self.host_peak = 0.0, None, 0

    def __enter__(self) -> _Measure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, kind, error, _traceback) -> bool:
        if error is not None and _is_oom(error):
            raise _out_of_memory(self.stage, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
        if error is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak = int(torch.cuda.max_memory_allocated(self.device))
        self.seconds = time.perf_counter() - self._start
        self.host_peak = host_peak_bytes()
        cap = _memory_cap()
        peak = self.device_peak if self.device_peak is not None else self.host_peak
        if cap is not None and peak > cap:
            raise _out_of_memory(self.stage, f"peak {peak / 2**20:.0f} MiB > the {cap / 2**20:.0f} MiB cap of {CAP_ENV}")
        return False


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


# ---------------------------------------------------------------------------------------------------- stages


def _check_positions(config: Config, model) -> None:
    """A sequence longer than the model's position table fails (or silently degrades) late: refuse it now."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = config.data.max_length
    if limit is not None and longest > limit:
        raise UserError(f"data.max_length={longest} exceeds the model's max_position_embeddings={limit}; "
                        f"lower data.max_length to ≤ {limit}")


def _longest_sft_micro_batches(config: Config, tokenizer, dist):
    """The configured accumulation × this rank's micro-batch, each built from the longest SFT sequences."""
    from integration_training import plan, sft

    stage = config.sft
    rendered = plan.render_mixture(tokenizer, config.data.sft_mixture, config, "sft_mixture")
    from integration_training.data.stream import SFTStream

    stream = SFTStream(rendered, config.data.shuffle_seed, stage.packing, config.data.max_length,
                       stage.examples_per_step)
    rows = stream.rows(0)
    longest = sorted(rows, key=lambda row: sum(len(r) for r in row), reverse=True)[: stage.batch_size]
    while len(longest) < stage.batch_size:  # fewer sequences than a micro-batch: repeat (the run would refuse)
        longest.append(longest[0])
    batch = sft.collate(longest, stage.packing, tokenizer.pad_token_id, config.model.attn_implementation)
    accumulation = sft.gradient_accumulation(stage, world_size(config.target))
    return [batch] * accumulation, sum(len(r) for row in longest for r in row) * accumulation, sft.total_steps(stage, stream)


def probe_sft(config: Config, dist, tokenizer) -> tuple[Stage, float]:
    """One SFT optimizer step on the longest micro-batches; (stage, seconds per validation batch)."""
    from integration_training import distributed, sft
    from integration_training.stage import Optimization

    model = sft._prepare_model(config, _base_path(config), dist)
    _check_positions(config, model)
    micro, tokens, steps = _longest_sft_micro_batches(config, tokenizer, dist)
    micro = [sft.batch_to(b, dist.device) for b in micro]
    shortcut = sft.lm_head_shortcut_exact(model, micro[0], config.model.dtype)  # as the run decides it
    loss_module = sft.SupervisedTokenLoss(model, config.model.dtype, shortcut)
    module = distributed.wrap_model(loss_module, config.target, dist, config.model.dtype)
    optimization = Optimization.build(model, config.sft, name="sft", config=config, dist=dist, gather_from=loss_module)
    with _Measure(dist.device, "sft step"):  # warm-up and the worst-case memory check
        sft.train_step(module, optimization, micro, tokens=tokens, lr_multiplier=1.0)
    with _Measure(dist.device, "sft step") as timed:
        sft.train_step(module, optimization, micro, tokens=tokens, lr_multiplier=1.0)
    with _Measure(dist.device, "sft step") as val:
        sft.validation_loss(module, micro[:1], dist)
    # step 0, every eval_every steps, and the last step (see sft.run_sft); each over eval_steps batches
    validations = (1 + steps // config.sft.eval_every + int(steps % config.sft.eval_every != 0)) * config.sft.eval_steps
    stage = Stage("sft step", timed.seconds, steps, False, timed.device_peak, timed.host_peak)
    del module, loss_module, model, optimization
    return stage, val.seconds * validations


def probe_rl(config: Config, dist, tokenizer, init_model: str) -> tuple[Stage, Stage]:
    """One worst-case rollout (no stop ids) and one training micro-batch at worst-case length (every row trained).

    The rollout runs its prefill, PROBE_WARMUP_STEPS untimed and PROBE_DECODE_STEPS timed decode steps,
    extrapolated to max_new_tokens like the evaluation chunk (its KV cache is allocated for the full length, so its
    memory peak is already reached). The update runs one micro-batch of `rl.batch_size` rows of max_new_tokens
    each — the largest forward/backward the run can meet, so its memory peak, with the optimizer's state already
    made by a one-row step — and an optimizer step; the step's
    time is that × the micro-batches a step of this rank's rows needs. (A second, warm micro-batch was timed
    here once: on the offline default it took 13.7 s against the first one's 12.1 s, so it bought no accuracy for
    a fifth of the probe's time; the SFT step keeps its warm-up, where the first step ran 1.55× the second.) Its
    typical share (`typical`) scales the update's tokens through the layers to the reference answers' mean length
    (what SFT teaches the model to write), keeping every row trained.
    """
    from integration_training import distributed, precision, rl as rl_module
    from integration_training.problems import rl_problems
    from integration_training.rollout import Completion, sample
    from integration_training.stage import Optimization, sampling_settings

    rl, max_new = config.rl, config.rl.sampling.max_new_tokens
    policy, _ = rl_module.load_policy(init_model, config.model, dist.device, training=True)
    _check_positions(config, policy)
    ref = rl_module.load_reference(init_model, config.model, dist.device) if rl.kl_coef > 0 else None
    model = distributed.wrap_model(policy, config.target, dist, config.model.dtype)
    optimization = Optimization.build(policy, rl, name="rl", config=config, dist=dist, gather_from=policy)
    problems = rl_problems(config, tokenizer)
    prompts = _longest_prompts(problems, tokenizer, rl.examples_per_step // world_size(config.target))
    generator = torch.Generator(device=dist.device).manual_seed(0)
    with _Measure(dist.device, "rl rollout") as rollout, precision.autocast(dist.device, config.model.dtype):
        rollout_seconds = _decode_extrapolated(
            lambda progress: sample(policy, prompts, num_samples=rl.num_samples, settings=sampling_settings(rl.sampling),
                                    special=_never_stopping(tokenizer),
                                    generator=generator, greedy_first=False, progress=progress), max_new)
    count = len(prompts) * rl.num_samples
    filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Worst-case completions: max_new_tokens drawn tokens each (token values do not change the cost).
    worst = Completion(token_ids=[filler] * max_new, logprobs=[-1.0] * max_new, finished=False, forced=[False] * max_new)
    completions = [[worst] * rl.num_samples for _ in prompts]
    signs = torch.tensor([[1.0 if (p * rl.num_samples + s) % 2 else -1.0 for s in range(rl.num_samples)]
                          for p in range(len(prompts))])
    rows = rl_module.make_rows(prompts, completions, signs.clamp(min=0), signs)
    assert len(rows) == count
    micro_batches = math.ceil(count / rl.batch_size)
    models = rl_module.PolicyModels.of(model, ref, config.model)
    # A one-row step first: it creates the optimizer's state (two fp32 moments per weight for AdamW), which every
    # step of the run after its first holds during the forward/backward (without it the probe's peak read 6.87 GiB
    # on the offline default, with it 7.90).
    rl_module.train_on_rows(models, optimization, rows[:1], rl=rl, pad_id=tokenizer.pad_token_id)
    with _Measure(dist.device, "rl train") as train:  # the largest micro-batch: the memory peak and the time
        rl_module.train_on_rows(models, optimization, rows[: rl.batch_size], rl=rl, pad_id=tokenizer.pad_token_id)
    prompt_tokens = sum(len(p) for p in prompts) / len(prompts)
    typical = _typical_completion_tokens(tokenizer, problems, max_new)
    share = _layer_tokens(prompt_tokens, typical, rl.num_samples) / _layer_tokens(prompt_tokens, max_new, rl.num_samples)
    steps = _rl_steps(config)
    del models, model, policy, optimization, ref
    return (Stage("rl rollout", rollout_seconds, steps, True, rollout.device_peak, rollout.host_peak),
            Stage("rl train", train.seconds * micro_batches, steps, False, train.device_peak, train.host_peak,
                  typical=share))


def _layer_tokens(prompt_tokens: float, completion_tokens: float, samples: int) -> float:
    """Tokens one group sends through the layers in RL's update: its prompt once, each sample's completion."""
    return prompt_tokens + samples * completion_tokens


def _typical_completion_tokens(tokenizer, examples, max_new_tokens: int) -> float:
    """Mean tokens of the data's reference answers + the end-of-turn token, capped at max_new_tokens."""
    answers = [e.messages[-1]["content"] for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    if not answers:
        return float(max_new_tokens)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    return min(sum(lengths) / len(lengths), float(max_new_tokens))


def _never_stopping(tokenizer):
    """The sampler's special tokens with no stop id: every row decodes max_new_tokens (the probe's worst case)."""
    from integration_training.rollout import SpecialTokens

    return SpecialTokens(stop_ids=frozenset(), pad_id=tokenizer.pad_token_id)


def _decode_extrapolated(run, max_new_tokens: int, prefill_scale: float = 1.0) -> float:
    """Seconds `run(progress)` (one sampling call) would take to decode max_new_tokens: its prefill × prefill_scale,
    then PROBE_WARMUP_STEPS decode steps left untimed (a fresh process's first steps at new shapes run ~2× slower:
    kernel selection, first-touch allocations) and PROBE_DECODE_STEPS timed ones, extrapolated (the per-step cost
    is flat: the KV cache is pre-allocated for the full length). The first progress call comes after the prefill
    and the first decode forward, so the prefill is that stamp less one step."""
    assert prefill_scale >= 1.0, prefill_scale
    stamps: list[float] = []

    def on_rows(_rows: float) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) > PROBE_WARMUP_STEPS + PROBE_DECODE_STEPS:
            raise _Enough

    start = time.perf_counter()
    try:
        run(on_rows)
    except _Enough:
        pass
    forwards = max(max_new_tokens - 1, 0)  # decode forwards in a full chunk (the last token needs none)
    timed = stamps[PROBE_WARMUP_STEPS:] if len(stamps) > PROBE_WARMUP_STEPS + 1 else stamps
    if len(timed) >= 2:
        per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
        prefill = max(stamps[0] - start - per_step, 0.0)
        return prefill * prefill_scale + per_step * forwards
    return (time.perf_counter() - start) * prefill_scale  # a call this short ran to the end: scale it all


def _longest_prompts(problems, tokenizer, count: int) -> list[list[int]]:
    """The `count` longest rendered prompts of `problems` (RL's or the evaluation's), longest first, each rendered
    once; the longest repeats when there are fewer than `count`."""
    from integration_training.template import render_prompt

    rendered = sorted((render_prompt(tokenizer, list(e.messages[:-1])) for e in problems), key=len, reverse=True)
    chosen = rendered[:count]
    while len(chosen) < count:
        chosen.append(chosen[0])
    return chosen


def probe_eval(config: Config, dist, tokenizer, model_name: str) -> tuple[float, Stage | None]:
    """(model load seconds, eval chunk stage with units = chunks per evaluation × evaluations)."""
    from integration_training import models, precision
    from integration_training.problems import held_out_problems
    from integration_training.rollout import sample
    from integration_training.stage import sampling_settings

    evaluation, sampling = config.evaluation, config.evaluation.sampling
    started = time.perf_counter()
    model, _ = models.load_policy(model_name, config.model, dist.device, training=False)
    load_seconds = time.perf_counter() - started
    evaluations = _evaluations(config)
    if evaluations == 0:
        return load_seconds, None
    rows_per_problem = evaluation.num_samples + 1
    problems = held_out_problems(config, tokenizer)
    per_rank = math.ceil(len(problems) / world_size(config.target))
    chunk_prompts = min(len(problems), max(1, sampling.batch_size // rows_per_problem))  # distinct prompts per chunk
    prompts, samples = eval_probe_shape(chunk_prompts, rows_per_problem)
    longest = _longest_prompts(problems, tokenizer, prompts)
    generator = torch.Generator(device=dist.device).manual_seed(0)
    with _Measure(dist.device, "eval chunk") as chunk, precision.autocast(dist.device, config.model.dtype):
        chunk_seconds = _decode_extrapolated(
            lambda progress: sample(model, longest, num_samples=samples, settings=sampling_settings(sampling),
                                    special=_never_stopping(tokenizer),
                                    generator=generator, greedy_first=True, progress=progress), sampling.max_new_tokens,
            prefill_scale=chunk_prompts / prompts)
    rows_per_eval = per_rank * rows_per_problem
    # The rows the timed chunk had: rounded up to whole prompts, but the sampler cuts at batch_size (a problem's
    # greedy + samples can exceed it) and the probe stops inside the first chunk.
    chunk_rows = min(prompts * samples, sampling.batch_size)
    units = evaluations * rows_per_eval / chunk_rows  # time scales with rows (decode is matmul-bound at this size)
    del model
    return load_seconds, Stage("eval chunk", chunk_seconds, units, True, chunk.device_peak, chunk.host_peak)


def eval_probe_shape(chunk_prompts: int, rows_per_problem: int) -> tuple[int, int]:
    """(distinct prompts, samples per prompt) for the eval chunk's probe: the longest 1/EVAL_PREFILL_SHARE of the
    chunk's prompts, each sampled often enough that the decode batch has at least the chunk's rows (its prefill is
    scaled back up by chunk_prompts / prompts; the padded width is the longest prompt's either way)."""
    assert chunk_prompts >= 1 and rows_per_problem >= 1, (chunk_prompts, rows_per_problem)
    prompts = math.ceil(chunk_prompts / EVAL_PREFILL_SHARE)
    samples = math.ceil(chunk_prompts * rows_per_problem / prompts)
    assert prompts * samples >= chunk_prompts * rows_per_problem
    return prompts, samples


def _evaluations(config: Config) -> int:
    """How many held-out evaluations the run does (cli.dispatch's and RL's: `evaluate.due_during_rl`)."""
    return sum(_evaluation_counts(config).values())


def _evaluation_counts(config: Config) -> dict[str, int]:
    """Evaluations per phase of cli.dispatch (the names of timings.jsonl)."""
    from integration_training.evaluate import due_during_rl

    evaluation = config.evaluation
    counts = {"baseline evaluation": int(evaluation.at_start),
              "after-SFT evaluation": int(evaluation.after_sft and runs_sft(config)),
              "RL (with its evaluations)": 0,
              "after-RL evaluation": int(evaluation.after_rl and runs_rl(config))}
    if runs_rl(config) and evaluation.every_rl_steps > 0:
        steps = _rl_steps(config)
        counts["RL (with its evaluations)"] = sum(due_during_rl(evaluation, done, steps)
                                                  for done in range(1, steps + 1))
    return counts


def _rl_steps(config: Config) -> int:
    from integration_training.problems import rl_steps, verified_problems

    if config.rl.num_iterations != -1:
        return config.rl.num_iterations
    return rl_steps(config.rl, len(verified_problems(config.data.rl_mixture, config.data.shuffle_seed,
                                                     "data.rl_mixture")))


def _base_path(config: Config) -> str:
    from integration_training import models

    return models.resolve_model_path(config.model.name)


def _model_loads(config: Config) -> int:
    counts = _evaluation_counts(config)
    # Each of the CLI's evaluations loads its model; RL's own evaluate the policy in memory.
    loads = sum(n for phase, n in counts.items() if phase != "RL (with its evaluations)")
    if runs_sft(config):
        loads += 1
    if runs_rl(config):
        loads += 1 + int(config.rl.kl_coef > 0)
    return loads


# ---------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Estimate:
    stages: list[Stage]
    fixed_seconds: float  # model loads, SFT validation
    wall_seconds: float  # how long the probe itself took
    phases: dict[str, float]  # predicted seconds per phase, named as cli's timings.jsonl names them

    @property
    def total(self) -> float:
        return self.fixed_seconds + sum(s.total for s in self.stages)

    @property
    def worst(self) -> float:
        return self.fixed_seconds + sum(s.worst for s in self.stages)

    @property
    def interval(self) -> tuple[float, float]:
        low = sum(s.total * (EARLY_STOP_FRACTION if s.decode else 1 - NOISE) for s in self.stages)
        return low + self.fixed_seconds * (1 - NOISE), self.worst * (1 + NOISE)

    def lines(self) -> list[str]:
        out = ["probe (measured at the config's worst-case shapes):"]
        for s in self.stages:
            device = f"device peak {s.device_peak / 2**30:.2f} GiB, " if s.device_peak is not None else ""
            typical = f" (typical {s.typical:.0%}: {s.total:.0f} s)" if s.typical != 1.0 else ""
            out.append(f"  {s.name:<11} {s.seconds_per_unit:8.2f} s/unit × {s.units:8.1f} = {s.worst:7.0f} s   "
                       f"{device}host peak RSS {s.host_peak / 2**30:.2f} GiB{typical}")
        low, high = self.interval
        out.append(f"  fixed (model loads, SFT validation): {self.fixed_seconds:.0f} s")
        out.append(f"predicted time: {self.total:.0f} s (interval {low:.0f}–{high:.0f} s; worst case {self.worst:.0f} s); "
                   f"probe took {self.wall_seconds:.0f} s")
        return out

    def to_json(self) -> dict:
        return {"predicted_seconds": self.total, "phases": self.phases, "interval": list(self.interval), "fixed_seconds": self.fixed_seconds,
                "worst_seconds": self.worst,
                "stages": {s.name: {"seconds_per_unit": s.seconds_per_unit, "units": s.units, "seconds": s.total,
                                    "worst_seconds": s.worst, "typical": s.typical,
                                    "device_peak": s.device_peak, "host_peak": s.host_peak} for s in self.stages}}


def run_probe(config: Config) -> Estimate:
    """Probe every stage the config runs, worst case first; UserError (→ exit 2) naming the field on OOM."""
    from integration_training import models
    from integration_training.distributed import all_reduce_max, init_distributed

    started = time.perf_counter()
    dist = init_distributed(config.target)
    tokenizer = models.load_tokenizer(_base_path(config))
    stages: list[Stage] = []
    fixed = 0.0
    if runs_sft(config):
        sft_stage, validation = probe_sft(config, dist, tokenizer)
        stages.append(sft_stage)
        fixed += validation
    if runs_rl(config):
        init = config.model.name if runs_sft(config) else str(config.output.source_checkpoint)
        stages += list(probe_rl(config, dist, tokenizer, init))
    load_seconds, eval_stage = probe_eval(config, dist, tokenizer, config.model.name if runs_sft(config)
                                          else str(config.output.source_checkpoint))
    if eval_stage is not None:
        stages.append(eval_stage)
    fixed += load_seconds * _model_loads(config)
    if dist.world_size > 1:  # the slowest / fullest rank is what the run waits for
        stages = [_max_over_ranks(s, dist, all_reduce_max) for s in stages]
    validation = fixed - load_seconds * _model_loads(config)
    return Estimate(stages, fixed, time.perf_counter() - started, _phases(config, stages, load_seconds, validation))


def _phases(config: Config, stages: list[Stage], load: float, validation: float) -> dict[str, float]:
    """Predicted seconds per phase of cli.dispatch (the names of timings.jsonl), for report.md."""
    by_name = {s.name: s for s in stages}
    evaluations = _evaluations(config)
    per_eval = by_name["eval chunk"].total / evaluations if "eval chunk" in by_name and evaluations else 0.0
    counts = _evaluation_counts(config)
    phases: dict[str, float] = {}
    if counts["baseline evaluation"]:
        phases["baseline evaluation"] = load + per_eval
    if runs_sft(config):
        phases["SFT"] = load + validation + by_name["sft step"].total
    if counts["after-SFT evaluation"]:
        phases["after-SFT evaluation"] = load + per_eval
    if runs_rl(config):
        phases["RL (with its evaluations)"] = (load * (1 + int(config.rl.kl_coef > 0)) + by_name["rl rollout"].total
                                               + by_name["rl train"].total
                                               + per_eval * counts["RL (with its evaluations)"])
    if counts["after-RL evaluation"]:
        phases["after-RL evaluation"] = load + per_eval
    return phases


def _max_over_ranks(stage: Stage, dist, all_reduce_max) -> Stage:
    values = torch.tensor([stage.seconds_per_unit, float(stage.device_peak or 0), float(stage.host_peak)],
                          dtype=torch.float64, device=dist.device)
    seconds, device_peak, host_peak = all_reduce_max(values, dist).tolist()
    return Stage(stage.name, seconds, stage.units, stage.decode,
                 int(device_peak) if stage.device_peak is not None else None, int(host_peak), typical=stage.typical)


def write_estimate(estimate: Estimate, run_dir: Path) -> None:
    """run_dir/estimate.json: what report.md compares the measured phase times with."""
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "estimate.json"
    staging = target.with_suffix(".json.tmp")
    staging.write_text(json.dumps(estimate.to_json(), indent=1) + "\n")
    os.replace(staging, target)
