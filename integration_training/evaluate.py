"""The evaluation stage: held-out pass@k, run before training, after SFT, after RL and every N RL steps.

`run(config, run_dir, stage, step, ...)` is the one entry point: the CLI calls it for the baseline
(`evaluation.at_start`), after SFT (`after_sft`) and after RL (`after_rl`) with a model to load; `rl.py` calls it
every `evaluation.every_rl_steps` with its policy in memory. Every setting comes from `config.evaluation`. Each
evaluation writes `eval/{stage}_step_N.jsonl` (one record per problem, with its per-problem scores) and
`eval/{stage}_step_N.json` (the aggregates with their intervals, the same numbers metrics.jsonl gets); the report
reads those files and recomputes nothing.

Per problem: one greedy completion and `k` sampled completions, each scored by the example's verifier with the
strict and the lenient parser. Aggregates (each with a 95% Wilson interval over problems, `stats.wilson_interval`):
- `greedy_strict`, `greedy_lenient`: accuracy of the greedy completion;
- `pass@1_*`, `pass@k_*`: the unbiased estimator 1 − C(n−c, j)/C(n, j) with n = k samples, c correct;
- `letter_acc` (only when ARC-style problems are present): the answer letter with the highest logit right after
  the generation prompt equals the reference (no sampling involved).
A sample is "correct" when `stats.is_correct(reward)` (verifiers return 0/1; custom rewards may be fractional).

The harness is split into `score_problems` (model work, shardable across ranks) and `aggregate` (pure), so a
distributed caller can gather the per-problem records before aggregating.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from integration_training.data.types import Example
from integration_training.errors import UserError
from integration_training.stats import Interval, is_correct, pass_at_k, wilson_interval

ARC_REWARD = "arc"
STAGES = ("baseline", "sft", "rl")  # what an evaluation is of: the model the run starts from, SFT's, RL's
METRICS_STAGE = "eval"  # the metrics.jsonl stage of the evaluations the CLI runs (RL's own go into RL's rows)
_OPTION_LINE = re.compile(r"^([A-Z])\. ", re.MULTILINE)


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ProblemRecord:
    """Everything measured on one problem; one JSONL line in run_dir/eval/."""

    index: int
    source: str
    prompt: list[dict[str, str]]
    reference: str | None
    reward: str
    greedy: str | None  # None when the greedy pass was skipped (CLI --no-greedy)
    greedy_strict: float | None
    greedy_lenient: float | None
    greedy_tokens: int | None
    completions: list[str]
    strict: list[float]
    lenient: list[float]
    tokens: list[int]  # completion lengths of the samples, in drawn tokens (tool-forced tokens not counted)
    letter: str | None = None  # ARC only: the letter with the highest logit
    letter_correct: float | None = None
    # With tools on: the calls in the greedy completion and in each sample ([{"expression", "result"}]); None = off
    greedy_tool_calls: list[dict[str, str]] | None = None
    tool_calls: list[list[dict[str, str]]] | None = None
    # Filled by `aggregate`: this problem's score in each aggregate ("greedy_strict": 0/1, "pass@1_strict": c/k,
    # ...), what the report's paired test compares; the aggregate is their mean.
    scores: dict[str, float] | None = None


@dataclass(frozen=True)
class EvalResult:
    k: int
    num_problems: int
    metrics: dict[str, Interval]  # "greedy_strict", "pass@1_strict", f"pass@{k}_lenient", "letter_acc", ...
    mean_response_tokens: float  # over sampled completions
    problems: list[ProblemRecord] = field(repr=False)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Flat {name: value} (plus _low/_high) for metrics.jsonl."""
        out: dict[str, float] = {f"{prefix}num_problems": self.num_problems}
        for name, interval in self.metrics.items():
            out[f"{prefix}{name}"] = interval.value
            out[f"{prefix}{name}_low"] = interval.low
            out[f"{prefix}{name}_high"] = interval.high
        out[f"{prefix}response_tokens"] = self.mean_response_tokens
        return out


# ---------------------------------------------------------------------------------------------------- aggregation


def problem_scores(problem: ProblemRecord, k: int) -> dict[str, float]:
    """One problem's score in every aggregate: greedy 0/1, unbiased pass@j from its k samples, the ARC letter."""
    scores: dict[str, float] = {}
    if problem.greedy_strict is not None:
        scores["greedy_strict"] = float(is_correct(problem.greedy_strict))
        scores["greedy_lenient"] = float(is_correct(problem.greedy_lenient))
    for mode, rewards in (("strict", problem.strict), ("lenient", problem.lenient)):
        correct = sum(is_correct(r) for r in rewards)
        for j in sorted({1, k}):
            scores[f"pass@{j}_{mode}"] = pass_at_k(k, correct, j)
    if problem.letter_correct is not None:
        scores["letter_acc"] = problem.letter_correct
    return scores


def aggregate(problems: Sequence[ProblemRecord], k: int) -> EvalResult:
    """Pure: per-problem records → the same records with their scores, and each score's mean with its interval."""
    assert problems, "nothing to aggregate"
    assert all(len(p.strict) == k for p in problems), "every problem needs exactly k samples"
    scored = [replace(p, scores=problem_scores(p, k)) for p in sorted(problems, key=lambda p: p.index)]
    with_greedy = all(p.greedy_strict is not None for p in problems)
    names = (["greedy_strict", "greedy_lenient"] if with_greedy else []) + [
        f"pass@{j}_{mode}" for j in sorted({1, k}) for mode in ("strict", "lenient")]
    if any("letter_acc" in p.scores for p in scored):
        names.append("letter_acc")  # over the problems that have a letter score (ARC-style ones)
    metrics = {name: wilson_interval([p.scores[name] for p in scored if name in p.scores]) for name in names}
    lengths = [t for p in problems for t in p.tokens]
    mean_tokens = sum(lengths) / len(lengths) if lengths else 0.0
    return EvalResult(k=k, num_problems=len(problems), metrics=metrics, mean_response_tokens=mean_tokens,
                      problems=scored)


# ---------------------------------------------------------------------------------------------------- model work


@dataclass(frozen=True)
class Scoring:
    """How every problem is scored: `num_samples` sampled completions (plus one greedy one when `greedy`), drawn
    with these settings from generator seed `seed`; `tools` (`data.tools` / `--tools`) run inside the sampler."""

    num_samples: int  # k ≥ 1
    max_new_tokens: int
    temperature: float  # 0 = greedy sampling
    top_k: int  # 0 = no top-k filter
    batch_size: int  # rows per sampling forward
    seed: int
    greedy: bool
    tools: tuple[str, ...]


def evaluate(model, tokenizer, examples: Sequence[Example], scoring: Scoring,
             progress: Callable[[float], None] | None = None) -> EvalResult:
    """Score `examples` (greedy + k samples each) and aggregate; see the module docstring."""
    records = score_problems(model, tokenizer, examples, range(len(examples)), scoring, progress=progress)
    return aggregate(records, scoring.num_samples)


def score_problems(model, tokenizer, examples: Sequence[Example], indices: Sequence[int], scoring: Scoring,
                   progress: Callable[[float], None] | None = None) -> list[ProblemRecord]:
    """Per-problem records; `indices` are the problems' global numbers (kept in the records for ordering).

    The records list each completion's tool calls when `scoring.tools` is set. `progress`, when given, receives
    problems done (fractions while decoding; the calls sum to len(examples)).
    """
    k, max_new_tokens, temperature, top_k = (scoring.num_samples, scoring.max_new_tokens, scoring.temperature,
                                             scoring.top_k)
    batch_size, seed, greedy, tools = scoring.batch_size, scoring.seed, scoring.greedy, scoring.tools
    from integration_training.tools import tool_calls, tool_runner
    from integration_training.template import render_prompt, stop_token_ids
    from integration_training.rewards import resolve_reward
    from integration_training.rollout import SamplingSettings, SpecialTokens, sample

    assert len(examples) == len(indices)
    assert k >= 1 and batch_size >= 1
    missing = sorted({e.source for e in examples if e.reward is None})
    if missing:
        raise UserError(f"evaluation: {', '.join(missing)} has no verifier (reward=None); "
                        "set DatasetSpec.reward to 'module:function' or use a task with answers")
    if not examples:
        return []
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, list(e.messages[:-1])) for e in examples]
    stops = stop_token_ids(tokenizer)
    pad = _pad_id(tokenizer)
    # One prefill per prompt: with `greedy` the first row of each prompt is argmax, the other k rows sample.
    rows_per_problem = k + int(greedy)
    on_rows = None if progress is None else (lambda rows: progress(rows / rows_per_problem))
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                batch_size=batch_size)
    out = sample(model, prompts, num_samples=rows_per_problem, settings=settings,
                 special=SpecialTokens(stop_ids=stops, pad_id=pad), generator=torch.Generator(device=device).manual_seed(seed),
                 greedy_first=greedy, tools=tool_runner(tokenizer, tools), progress=on_rows)
    greedy_out = [row[:1] for row in out] if greedy else None
    sampled = [row[int(greedy):] for row in out]
    letters = _letter_choices(model, tokenizer, examples, prompts, batch_size)
    records = []
    for i, example in enumerate(examples):
        verifier = resolve_reward(example.reward)
        g_ids = greedy_out[i][0].token_ids if greedy_out is not None else None
        g_text = decode(tokenizer, g_ids) if g_ids is not None else None
        texts = [decode(tokenizer, c.token_ids) for c in sampled[i]]
        letter = letters.get(i)
        records.append(ProblemRecord(
            index=int(indices[i]),
            source=example.source,
            prompt=[dict(m) for m in example.messages[:-1]],
            reference=example.reference,
            reward=example.reward,
            greedy=g_text,
            greedy_strict=None if g_text is None else float(verifier.strict(g_text, example.reference)),
            greedy_lenient=None if g_text is None else float(verifier.lenient(g_text, example.reference)),
            greedy_tokens=None if g_ids is None else _drawn(greedy_out[i][0]),
            completions=texts,
            strict=[float(verifier.strict(t, example.reference)) for t in texts],
            lenient=[float(verifier.lenient(t, example.reference)) for t in texts],
            tokens=[_drawn(c) for c in sampled[i]],
            letter=letter,
            letter_correct=None if letter is None else float(letter == example.reference),
            greedy_tool_calls=tool_calls(g_text) if tools and g_text is not None else None,
            tool_calls=[tool_calls(t) for t in texts] if tools else None,
        ))
    return records


def _drawn(completion) -> int:
    """Response length: the tokens the model drew (a tool's forced tokens are not the model's output)."""
    return len(completion.token_ids) - sum(completion.forced)


def decode(tokenizer, token_ids: Sequence[int]) -> str:
    """Completion text as verifiers see it: special tokens (the stop token) removed."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert pad is not None, "tokenizer has neither a pad nor an EOS token"
    return int(pad)


def option_letters(example: Example) -> list[str]:
    """The choice letters offered in an ARC-style prompt ("A. ...", "B. ..." lines)."""
    return _OPTION_LINE.findall(example.messages[-2]["content"])


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int] | None:
    """One token id per letter as the assistant would start its answer, or None if a letter is not one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    return ids if len(set(ids)) == len(ids) else None


def _letter_choices(model, tokenizer, examples, prompts, batch_size) -> dict[int, str]:
    """ARC problems: the option letter whose token has the highest next-token logit after the prompt."""
    from integration_training.rollout import left_pad

    wanted = [i for i, e in enumerate(examples) if e.reward == ARC_REWARD and option_letters(e)]
    device = next(model.parameters()).device
    out: dict[int, str] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start : start + batch_size]
            ids, mask, pos = left_pad([prompts[i] for i in chunk], _pad_id(tokenizer), device)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
            for row, i in enumerate(chunk):
                letters = option_letters(examples[i])
                token_ids = letter_token_ids(tokenizer, letters)
                if token_ids is None:
                    continue  # a tokenizer that splits a bare letter: no letter-logit score for this problem
                best = int(logits[row, token_ids].float().argmax())
                out[i] = letters[best]
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------- output


def write_records(result: EvalResult, path: Path) -> Path:
    """Per-problem records as JSONL (written to a temp name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in result.problems:
            f.write(json.dumps(asdict(record)) + "\n")
    tmp.replace(path)
    return path


def eval_records_path(run_dir: Path, stage: str, step: int) -> Path:
    return Path(run_dir) / "eval" / f"{stage}_step_{step:06d}.jsonl"


def format_table(result: EvalResult, title: str) -> str:
    """A small fixed-width table: metric, value, 95% interval."""
    lines = [title, f"{'metric':<18} {'value':>7}  95% interval"]
    for name, iv in result.metrics.items():
        lines.append(f"{name:<18} {iv.value:>7.3f}  [{iv.low:.3f}, {iv.high:.3f}]")
    lines.append(f"{'response tokens':<18} {result.mean_response_tokens:>7.1f}")
    lines.append(f"{'problems':<18} {result.num_problems:>7d}")
    return "\n".join(lines)


def result_to_json(result: EvalResult, settings: dict) -> dict:
    return {
        "settings": settings,
        "k": result.k,
        "num_problems": result.num_problems,
        "mean_response_tokens": result.mean_response_tokens,
        "metrics": {name: asdict(iv) for name, iv in result.metrics.items()},
        "problems": [asdict(p) for p in result.problems],
    }


# ---------------------------------------------------------------------------------------------------- the stage


def summary_path(run_dir: Path, stage: str, step: int) -> Path:
    """The aggregates of one evaluation, next to its records; written last, so it marks the evaluation done."""
    return eval_records_path(run_dir, stage, step).with_suffix(".json")


def write_summary(result: EvalResult, path: Path, stage: str, step: int, values: dict[str, float]) -> Path:
    """The aggregates (with their intervals) and the flat values metrics.jsonl gets, atomically."""
    payload = {"stage": stage, "step": step, "k": result.k, "num_problems": result.num_problems,
               "interval": "wilson", "metrics": {name: asdict(iv) for name, iv in result.metrics.items()},
               "mean_response_tokens": result.mean_response_tokens, "values": values}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return path


def scoring_of(config) -> Scoring:
    """The run's evaluation settings: `evaluation.num_samples` and `evaluation.sampling`, seeded by
    `data.shuffle_seed` (every evaluation of a run draws from the same seed), with the run's tools."""
    evaluation, sampling = config.evaluation, config.evaluation.sampling
    return Scoring(num_samples=evaluation.num_samples, max_new_tokens=sampling.max_new_tokens,
                   temperature=sampling.temperature, top_k=sampling.top_k, batch_size=sampling.batch_size,
                   seed=config.data.shuffle_seed, greedy=True, tools=tuple(config.data.tools))


def due_during_rl(evaluation, done: int, steps: int) -> bool:
    """Whether RL evaluates its policy after step `done` of `steps`: every `evaluation.every_rl_steps` (0 = never),
    except the final step when `evaluation.after_rl` is set — the CLI evaluates RL's final checkpoint then."""
    every = evaluation.every_rl_steps
    return every > 0 and done % every == 0 and not (done == steps and evaluation.after_rl)


def run(config, run_dir: Path, stage: str, step: int, *, source: str | Path | None = None, model=None,
        tokenizer=None, dist=None, problems: Sequence[Example] | None = None) -> dict[str, float]:
    """The evaluation stage: score one model on the held-out problems; return the values metrics.jsonl gets.

    `stage` says what is evaluated ("baseline": the model the run starts from; "sft": SFT's final checkpoint;
    "rl": an RL checkpoint) and `step` its step. Either `source` (a model to load: what the CLI passes for the
    baseline, after SFT and after RL) or `model` + `tokenizer` (in memory: RL every `evaluation.every_rl_steps`,
    the `distributed.lockstep` proxy under FSDP2; RL logs the values in its own metrics rows, the CLI's go into
    metrics.jsonl as `eval` lines). Every rank scores its shard; rank 0 writes the records and the aggregates. An
    evaluation already written (a resumed run) is not redone: its saved values are returned.
    """
    from integration_training.distributed import barrier, init_distributed

    assert stage in STAGES, stage
    assert (source is None) != (model is None), "evaluate either a model to load or one in memory"
    done = summary_path(run_dir, stage, step)
    if done.is_file():
        return json.loads(done.read_text())["values"]
    dist = dist if dist is not None else init_distributed(config.target)
    if model is None:
        from integration_training import models

        model, tokenizer = models.load_policy(source, config.model, dist.device, training=False)
    if problems is None:
        from integration_training.problems import held_out_problems

        problems = held_out_problems(config, tokenizer)
    result = _score_sharded(config, model, tokenizer, problems, dist, f"{stage} eval @ step {step}")
    values = result.summary(prefix="eval/")
    if dist.is_main:
        write_records(result, eval_records_path(run_dir, stage, step))
        if source is not None:  # before the done marker: a crash in between repeats the line, never loses it
            _log_metrics(config, run_dir, stage, step, values)
        write_summary(result, done, stage, step, values)
    barrier(dist)
    return values


def _score_sharded(config, model, tokenizer, problems: Sequence[Example], dist, title: str) -> EvalResult:
    """This rank's shard of the problems scored, the records gathered in problem order, aggregated.

    Every problem is scored exactly once (round-robin shards may differ by one problem: none is dropped), so the
    aggregates equal a single-process evaluation's. With an FSDP2 policy the caller passes the
    `distributed.lockstep` proxy, so that ranks with fewer problems keep pairing forwards.
    """
    from integration_training.console import phase_bar
    from integration_training.distributed import all_gather_objects
    from integration_training.precision import autocast

    indices = list(range(len(problems)))[dist.rank :: dist.world_size]
    bar = phase_bar(len(indices), title, "problems", dist.is_main)  # rank 0's shard paces the bar
    try:
        with autocast(dist.device, config.model.dtype):
            records = score_problems(model, tokenizer, [problems[i] for i in indices], indices, scoring_of(config),
                                     progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    records = sorted(all_gather_objects(records, dist), key=lambda r: r.index)
    assert [r.index for r in records] == list(range(len(problems))), "each problem scored exactly once"
    return aggregate(records, config.evaluation.num_samples)


def _log_metrics(config, run_dir: Path, stage: str, step: int, values: dict[str, float]) -> None:
    """One `eval` line in metrics.jsonl (and wandb), saying what was evaluated."""
    from integration_training.config import to_dict
    from integration_training.metrics import MetricsLogger

    output = config.output
    with MetricsLogger(run_dir, METRICS_STAGE, True, output.use_wandb, output.wandb_project,
                       output.experiment_name, to_dict(config)) as metrics:
        metrics.log(step, {"evaluated": stage, **values})


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m integration_training.evaluate",
        description="Score a model (HF id, local dir, run checkpoint, or offline:SmolLM2-135M-Instruct) with pass@k.",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="openai/gsm8k, allenai/ai2_arc, arithmetic, spelling, ...")
    parser.add_argument("--split", required=True)
    parser.add_argument("--subset", default=None)
    parser.add_argument("--path", default=None, help="local file/dir in the hub's row schema")
    parser.add_argument("--max-samples", type=int, default=None, help="the first N problems (all when omitted)")
    parser.add_argument("--reward", default=None, help="override the verifier, e.g. module:function")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy pass (halves the prompt work)")
    parser.add_argument("--tools", nargs="*", default=[], metavar="TOOL",
                        help="tools the model may call, e.g. --tools calculator (default: none)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--out", default=None, help="JSON results file (default: eval_results.json)")
    return parser.parse_args(list(argv))


def load_problems(name: str, split: str, subset: str | None, path: str | None, max_samples: int | None,
                  reward: str | None, seed: int, tools: Sequence[str] = ()) -> list[Example]:
    """The first `max_samples` problems of one source, in source order (comparable with other harnesses)."""
    from integration_training.config import DatasetSpec
    from integration_training.data import load_all

    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {max_samples}")
    spec = DatasetSpec(name=name, split=split, subset=subset, max_samples=max_samples, repeat=1, path=path,
                       reward=reward)
    examples = load_all(spec, seed, tools)  # procedural sources generate exactly max_samples
    return examples[:max_samples] if max_samples is not None else examples


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    return torch.device(name)


def run_cli(args: argparse.Namespace) -> dict:
    from integration_training.models import load_model, load_tokenizer, resolve_model_path

    for flag, value, minimum in (("--k", args.k, 1), ("--batch-size", args.batch_size, 1),
                                 ("--max-new-tokens", args.max_new_tokens, 1), ("--top-k", args.top_k, 0)):
        if value < minimum:
            raise UserError(f"{flag} must be >= {minimum}, got {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    from integration_training.tools import validate_tools

    tool_problems = validate_tools(args.tools)
    if tool_problems:
        raise UserError(f"--tools: {'; '.join(tool_problems)}")
    examples = load_problems(args.dataset, args.split, args.subset, args.path, args.max_samples, args.reward,
                             args.seed, args.tools)
    device = resolve_device(args.device)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, "sdpa", device, training=False)
    from integration_training.console import phase_bar

    start = time.perf_counter()
    bar = phase_bar(len(examples), "evaluation", "problems", is_main=True)
    try:
        scoring = Scoring(num_samples=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, batch_size=args.batch_size, seed=args.seed, greedy=not args.no_greedy,
                          tools=tuple(args.tools))
        result = evaluate(model, tokenizer, examples, scoring, progress=bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    settings = {key: getattr(args, key) for key in vars(args)} | {"seconds": seconds, "device": str(device)}
    payload = result_to_json(result, settings)
    out = Path(args.out or "eval_results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    title = (f"{args.model} on {args.dataset}/{args.split} ({result.num_problems} problems, k={args.k}, "
             f"tools: {', '.join(args.tools) or 'off'}, {seconds:.0f}s)")
    print(format_table(result, title))
    print(f"saved {out}")
    return payload


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    try:
        run_cli(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
