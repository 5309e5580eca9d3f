"""SFT throughput: our SFT step vs TRL's SFTTrainer, same model / data / max length / effective batch, CPU float32.

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/bench_sft.py

Each (side, repetition) runs in a fresh subprocess (`--side ours|trl --rep i`, one JSON line back), so peak RSS is
per side and neither side inherits the other's allocator state or warm caches. Sides alternate A/B, B/A, ... over
`--reps` repetitions in one invocation; the table reports the median of ours/TRL with the min and max.

Timing: model load, tokenisation/packing and the first (warm-up) optimizer step are excluded on both sides; the
clock runs from the end of the warm-up step to the end of the last step, so data collation, forward, backward,
gradient clipping and the AdamW update are all inside it. Token counts come from the batches each side actually
trained on: `tokens` = real (non-padding) tokens fed to the model, `supervised` = positions carrying a loss term.

Same workload on both sides:
- model: the offline SmolLM2-135M-Instruct (`provision_offline_model()`), float32, SDPA attention, CPU;
- data: the first rows (seeded sample) of local GSM8K train, turned into (user question, assistant answer)
  conversations by our GSM8K adapter; TRL gets the very same messages as a conversational prompt-completion dataset;
- loss on the assistant answer and its end-of-turn token only (ours: assistant-only mask; TRL: completion-only loss);
- packing into rows of `--max-length` tokens, `--batch-size` rows per micro-batch × `--accum` micro-batches per step;
- AdamW, constant LR 1e-5, no weight decay, grad clip 1.0, torch's default intra-op threads (= cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The hub id is downloaded (and cached by `datasets`) at run time; `--data PATH` reads a local GSM8K-schema file.
HUB_DATA = "hub:openai/gsm8k"
MARK = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------- shared setup


def load_examples(path: str, rows: int):
    from integration_training.config import DatasetSpec
    from integration_training.data import build_mixture

    local = None if path == HUB_DATA else path
    spec = DatasetSpec(name="openai/gsm8k", split="train", subset="main", max_samples=rows, repeat=1, path=local,
                       reward=None)
    return build_mixture([spec], seed=0).examples


def load_model_and_tokenizer():
    import torch

    from integration_training.models import load_model, load_tokenizer, provision_offline_model

    torch.manual_seed(0)
    path = str(provision_offline_model())
    return load_model(path, "float32", "sdpa", "cpu", training=True), load_tokenizer(path)


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------------------------------- our side


def run_ours(args) -> dict:
    import torch

    from integration_training import distributed, optim, sft, template
    from integration_training.stage import Optimization
    from integration_training.config import OptimizerConfig, SFTConfig, TargetConfig

    examples = load_examples(args.data, args.rows)
    model, tokenizer = load_model_and_tokenizer()
    model.config.use_cache = False
    model.train()
    target = TargetConfig(gpu_ranks=[], device_type="cpu", processes_per_node=1, parallelism="none", num_nodes=1,
                          node_rank=0, master_addr="127.0.0.1", master_port=29500)
    dist = distributed.init_distributed(target)
    stage = SFTConfig(num_epochs=1, num_iterations=-1, batch_size=args.batch_size,
                      examples_per_step=args.batch_size * args.accum,
                      optimizer=OptimizerConfig(name="adamw", embedding_lr=args.lr, unembedding_lr=args.lr,
                                                matrix_lr=args.lr, weight_decay=0.0, init_lr_frac=1.0, warmup_ratio=0.0,
                                                lr_schedule="constant", grad_clip=1.0),
                      packing=True, eval_every=10**9, eval_steps=1,
                      checkpoint_every=10**9, log_every=1)
    module = sft.SupervisedTokenLoss(model, "float32", True)
    optimization = Optimization(optim.build_optimizer(model, stage.optimizer), grad_clip=stage.optimizer.grad_clip,
                                dist=dist)
    rendered, _ = template.render_examples(tokenizer, examples, args.max_length)
    stream = sft.SFTStream(rendered=rendered, seed=0, packing=True, max_length=args.max_length,
                           sequences_per_step=stage.examples_per_step)
    total = args.warmup + args.steps
    have = stream.steps_in_epoch(0)
    assert have >= total, f"need {total} steps of data, have {have}; raise --rows"

    tokens = supervised = 0
    losses = []
    start = None
    for step in range(total):
        sequences = stream.step_sequences(step)
        micro = sft.rank_micro_batches(sequences, stage.batch_size, dist, True, tokenizer.pad_token_id, "sdpa")
        step_tokens = sum(len(r) for row in sequences for r in row)
        result = sft.train_step(module, optimization, micro, tokens=step_tokens, lr_multiplier=1.0)
        losses.append(result.loss)
        if step == args.warmup - 1:
            start = time.perf_counter()
        elif step >= args.warmup:
            tokens += result.tokens
            supervised += result.supervised_tokens
    elapsed = time.perf_counter() - start
    return {"side": "ours", "seconds": elapsed, "steps": args.steps, "tokens": tokens, "supervised": supervised,
            "losses": losses, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- TRL side


def step_clock(marks: list[float], logged: list[float], key: str):
    """A TrainerCallback appending the wall clock at every step end and each logged value of `key` (both scripts)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and key in logs:
                logged.append(float(logs[key]))

    return Clock()


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples = load_examples(args.data, args.rows)
    model, tokenizer = load_model_and_tokenizer()
    dataset = Dataset.from_list(
        [{"prompt": [dict(m) for m in e.messages[:-1]], "completion": [dict(e.messages[-1])]} for e in examples]
    )
    total = args.warmup + args.steps
    counts = {"tokens": 0, "supervised": 0}
    marks: list[float] = []
    losses: list[float] = []

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step >= args.warmup:  # count only the timed steps' batches
                if inputs.get("attention_mask") is not None:
                    counts["tokens"] += int(inputs["attention_mask"].sum())
                else:  # padding-free: one flattened row, no padding
                    counts["tokens"] += int(inputs["input_ids"].numel())
                counts["supervised"] += int((inputs["labels"][:, 1:] != -100).sum())  # HF shifts labels inside
            loss = super().training_step(model, inputs, num_items_in_batch)
            return loss

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_length=args.max_length, packing=True, packing_strategy="bfd",
            completion_only_loss=True, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accum, max_steps=total, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True,
            bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to=[], seed=0,
            dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
        )
        trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                           callbacks=[step_clock(marks, losses, "loss")])
        trainer.train()
    assert len(marks) == total, (len(marks), total)
    elapsed = marks[-1] - marks[args.warmup - 1]
    return {"side": "trl", "seconds": elapsed, "steps": args.steps, "tokens": counts["tokens"],
            "supervised": counts["supervised"], "losses": losses, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(), "padding_free": bool(trainer.padding_free)}


# ---------------------------------------------------------------------------------------------------- driver


def child(args) -> None:
    set_threads(args.threads)
    result = run_ours(args) if args.side == "ours" else run_trl(args)
    result["rep"] = args.rep
    print(MARK + json.dumps(result), flush=True)


CHILD_ARGS = ("data", "rows", "max_length", "batch_size", "accum", "steps", "warmup", "lr", "threads")


def run_child(script: str, names: tuple[str, ...], side: str, rep: int, args) -> dict:
    """Run one (side, repetition) of `script` in a fresh process with the options `names`; its JSON result line."""
    command = [sys.executable, str(Path(script).resolve()), "--side", side, "--rep", str(rep)]
    for name in names:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} rep {rep} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARK):])


def versions() -> str:
    from importlib.metadata import version

    names = ["torch", "transformers", "trl", "accelerate", "datasets"]
    return ", ".join(f"{n} {version(n)}" for n in names)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarise(results: list[dict], args) -> None:
    by = {"ours": [r for r in results if r["side"] == "ours"], "trl": [r for r in results if r["side"] == "trl"]}
    print()
    print("per run:")
    for r in results:
        print(f"  rep {r['rep']} {r['side']:>4}: {r['seconds']:.2f}s for {r['steps']} steps, {r['tokens']} tokens "
              f"({r['tokens'] / r['seconds']:.0f} tok/s), {r['supervised']} supervised "
              f"({r['supervised'] / r['seconds']:.0f} sup tok/s), peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"first losses {[round(x, 3) for x in r['losses'][:2]]}")

    def metric(r, key):
        if key == "tok/s":
            return r["tokens"] / r["seconds"]
        if key == "sup tok/s":
            return r["supervised"] / r["seconds"]
        if key == "step s":
            return r["seconds"] / r["steps"]
        return r["peak_rss_mb"]

    print()
    print("| metric | ours (median) | TRL (median) | ours/TRL median | min | max |")
    print("|---|---|---|---|---|---|")
    for key in ("sup tok/s", "tok/s", "step s", "peak RSS MB"):
        pairs = list(zip(by["ours"], by["trl"], strict=True))  # paired by repetition
        ratios = [metric(o, key) / metric(t, key) for o, t in pairs]
        med_o = statistics.median(metric(o, key) for o in by["ours"])
        med_t = statistics.median(metric(t, key) for t in by["trl"])
        print(f"| {key} | {med_o:.1f} | {med_t:.1f} | {statistics.median(ratios):.2f}x | {min(ratios):.2f}x | "
              f"{max(ratios):.2f}x |")
    sup_ratio = statistics.median(metric(o, "sup tok/s") / metric(t, "sup tok/s")
                                  for o, t in zip(by["ours"], by["trl"], strict=True))
    print(f"\ntarget: ours >= 1.5x TRL supervised tok/s -> {'MET' if sup_ratio >= 1.5 else 'NOT MET'} "
          f"({sup_ratio:.2f}x)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmark scripts take (one side per process, repetitions, data, warm-up, threads)."""
    parser.add_argument("--side", choices=["ours", "trl"], help="internal: run one side in this process")
    parser.add_argument("--rep", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3, help="alternating A/B repetitions")
    parser.add_argument("--data", default=HUB_DATA,
                        help=f"a GSM8K-schema train.jsonl, or {HUB_DATA} (default: downloaded at run time)")
    parser.add_argument("--rows", type=int, default=256, help="GSM8K rows to load (seeded sample)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads per side (0 = torch default, one per core)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after --warmup)")
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    assert args.warmup >= 1, "the first step is always excluded"
    if args.side:
        child(args)
        return
    if args.data != HUB_DATA and not Path(args.data).is_file():
        raise SystemExit(f"GSM8K train file not found: {args.data} (pass --data)")
    print(f"SFT benchmark: {args.reps} alternating repetitions; SmolLM2-135M-Instruct float32 CPU sdpa; "
          f"GSM8K {args.rows} rows from {args.data}; max_length {args.max_length}; effective batch "
          f"{args.batch_size}x{args.accum} packed rows of <= {args.max_length} tokens; {args.warmup} warm-up + "
          f"{args.steps} timed steps; torch threads per side: {args.threads or 'default'}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {versions()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("ours: template.render_examples (assistant-only mask) -> data.stream (best fit decreasing rows) -> collate_packed (4-D block mask) "
          "-> sft.train_step with SupervisedTokenLoss (LM head only at supervised positions), AdamW")
    print("TRL : SFTTrainer, conversational prompt-completion dataset, completion_only_loss=True, packing=True "
          "(bfd => padding_free, position_ids), use_cpu=True, bf16=False, adamw_torch")
    results = []
    for rep in range(args.reps):
        order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
        for side in order:
            result = run_child(__file__, CHILD_ARGS, side, rep, args)
            print(f"  rep {rep} {side}: {result['tokens'] / result['seconds']:.0f} tok/s, "
                  f"{result['supervised'] / result['seconds']:.0f} supervised tok/s, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
            results.append(result)
    summarise(results, args)


if __name__ == "__main__":
    main()
