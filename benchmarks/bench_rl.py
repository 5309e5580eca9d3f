"""RL step time: our RL step vs TRL's GRPOTrainer (HF generate, no vLLM), same prompts × samples × new tokens, CPU.

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/bench_rl.py

One optimizer step = `--prompts` GSM8K train prompts × `--samples` completions of at most `--new-tokens` tokens,
rewarded 0/1 by `parity_reward` (the same function on both sides), group-normalised advantages, one
forward/backward over all the step's completions, one AdamW step. The reward is a stand-in on purpose: the base model
scores 0 on GSM8K's verifier, so every group would be uniform, every advantage 0, and our trainer — which leaves
zero-advantage rows out of the forward/backward, exactly — would time no training at all. A reward that is 1 for an
even number of characters is ~50 % per sample and independent across samples, so ~99 % of groups carry a gradient
and both sides train on (almost) every row. The default is 2 × 8 × 32 (16 completions per
step) so that the default run stays under ~10 minutes on 2 CPU cores; `--prompts 8` gives the 8 × 8 × 32
(64-completion) step, which takes far longer per repetition on such a machine.

Each (side, repetition) runs in a fresh subprocess (`--side ours|trl --rep i`, one JSON line back), sides alternate
A/B, B/A, ...; the table reports per-step wall time split into generation (sampling + reward + advantages) and
training (scoring forward/backward + optimizer), median ratio ours/TRL with min and max over repetitions.
Model load, dataset preparation and the first (warm-up) step are excluded on both sides.

Settings:
- ours: `rl.rollout_step` (`rollout.sample`: each distinct prompt prefilled once, KV cache gathered to its samples,
  finished rows compacted) + `rl.train_on_rows` (each group's prompt scored once, LM head only at completion
  positions), `batch_size` = `sampling.batch_size` = prompts × samples (one sampling batch, one training
  micro-batch), kl_coef=0
  (no reference model), advantage="mean_std", updates_per_batch=1, AdamW;
- TRL: GRPOTrainer, use_vllm=False (transformers `generate`), use_cpu=True, bf16=False, beta=0 (no reference
  model), num_generations=8, per_device_train_batch_size = prompts × samples, gradient_accumulation_steps=1 (so
  generation_batch_size = prompts × samples: one generate call and one optimizer step per step),
  max_completion_length=32, num_iterations=1, loss_type="dapo" (default), scale_rewards="group" (default),
  shuffle_dataset=False.
Both: SmolLM2-135M-Instruct float32 SDPA, temperature 1.0, top_k 0, top_p 1.0, lr 1e-6, grad clip 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_sft import (  # noqa: E402
    HUB_DATA,
    MARK,
    add_common_arguments,
    cpu_model,
    load_examples,
    load_model_and_tokenizer,
    peak_rss_mb,
    run_child,
    set_threads,
    step_clock,
    versions,
)


# ---------------------------------------------------------------------------------------------------- reward


def parity_reward(completion: str, reference: str) -> float:
    """1.0 for an even number of characters: ~50 % per sample, so groups are almost never uniform."""
    return float(len(completion) % 2 == 0)


PARITY = f"{__name__ if __name__ != '__main__' else 'benchmarks.bench_rl'}:parity_reward"


# ---------------------------------------------------------------------------------------------------- our side


def run_ours(args) -> dict:
    import torch

    from integration_training import distributed, optim, rl
    from integration_training import template
    from integration_training.rollout import SpecialTokens
    from integration_training.stage import Optimization, sampling_settings
    from integration_training.config import ModelConfig, OptimizerConfig, RLConfig, SamplingConfig, TargetConfig

    import dataclasses

    examples = [dataclasses.replace(e, reward=PARITY) for e in load_examples(args.data, args.rows)]
    model, tokenizer = load_model_and_tokenizer()
    target = TargetConfig(gpu_ranks=[], device_type="cpu", processes_per_node=1, parallelism="none", num_nodes=1,
                          node_rank=0, master_addr="127.0.0.1", master_port=29500)
    dist = distributed.init_distributed(target)
    config = RLConfig(
        num_epochs=1, num_iterations=args.warmup + args.steps, examples_per_step=args.prompts,
        num_samples=args.samples, batch_size=args.batch_size,
        sampling=SamplingConfig(batch_size=args.batch_size, max_new_tokens=args.new_tokens, temperature=1.0, top_k=0),
        optimizer=OptimizerConfig(name="adamw", embedding_lr=args.lr, unembedding_lr=args.lr, matrix_lr=args.lr,
                                  weight_decay=0.0, init_lr_frac=1.0, warmup_ratio=0.0, lr_schedule="constant",
                                  grad_clip=1.0),
        advantage="mean_std", kl_coef=0.0, clip_eps=0.2, updates_per_batch=1, checkpoint_every=10**9, log_every=1,
    )
    optimization = Optimization(optim.build_optimizer(model, config.optimizer), grad_clip=config.optimizer.grad_clip,
                                dist=dist)
    optimization.set_lr(1.0)
    model_config = ModelConfig(name="unused", dtype="float32", compile=False, attn_implementation="sdpa",
                               gradient_checkpointing=False, lora=None)
    rollouts = rl.Rollouts(tokenizer=tokenizer, special=SpecialTokens(stop_ids=template.stop_token_ids(tokenizer),
                                                                      pad_id=tokenizer.pad_token_id),
                           settings=sampling_settings(config.sampling), tools=None, dtype="float32")
    model.train()
    gen, train, tokens, rewards, skipped = [], [], [], [], []
    for step in range(args.warmup + args.steps):
        batch = examples[step * args.prompts : (step + 1) * args.prompts]
        generator = torch.Generator(device="cpu").manual_seed(1000 + step)
        t0 = time.perf_counter()
        rows, stats = rl.rollout_step(model, batch, generator, rollouts=rollouts, rl=config)
        t1 = time.perf_counter()
        trained = rl.train_on_rows(rl.PolicyModels.of(model, None, model_config), optimization, rows, rl=config,
                                   pad_id=tokenizer.pad_token_id)
        t2 = time.perf_counter()
        skipped.append(trained["skipped_frac"])
        if step >= args.warmup:
            gen.append(t1 - t0)
            train.append(t2 - t1)
            tokens.append(stats["tokens"] / stats["completions"])
            rewards.append(stats["reward_sum"] / stats["completions"])
    return {"side": "ours", "gen": gen, "train": train, "completion_len": statistics.mean(tokens),
            "reward": statistics.mean(rewards), "skipped_rows": statistics.mean(skipped), "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- TRL side


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    examples = load_examples(args.data, args.rows)
    model, tokenizer = load_model_and_tokenizer()
    total = args.warmup + args.steps
    needed = total * args.prompts
    dataset = Dataset.from_list([{"prompt": [dict(m) for m in e.messages[:-1]], "reference": e.reference}
                                 for e in examples[:needed]])
    def parity(completions, reference, **kwargs):
        return [parity_reward(c[0]["content"], r) for c, r in zip(completions, reference, strict=True)]

    marks: list[float] = []
    gen_times: list[float] = []
    lengths: list[float] = []
    rewards: list[float] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            gen_times.append(time.perf_counter() - t0)
            mask = out["completion_mask"]
            lengths.append(float(mask.sum(dim=1).float().mean()))
            return out

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_vllm=False, use_cpu=True, bf16=False, fp16=False, beta=0.0,
            num_generations=args.samples, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.prompts * args.samples // args.batch_size,
            max_completion_length=args.new_tokens, num_iterations=1, temperature=1.0, top_k=0, top_p=1.0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            max_steps=total, logging_steps=1, save_strategy="no", report_to=[], seed=0, shuffle_dataset=False,
            dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        )
        trainer = Timed(model=model, reward_funcs=parity, args=config, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[step_clock(marks, rewards, "reward")])
        trainer.train()
    assert len(marks) == total and len(gen_times) == total, (len(marks), len(gen_times), total)
    steps = [marks[i] - marks[i - 1] for i in range(args.warmup, total)]
    gen = gen_times[args.warmup :]
    train = [s - g for s, g in zip(steps, gen, strict=True)]
    return {"side": "trl", "gen": gen, "train": train, "completion_len": statistics.mean(lengths[args.warmup :]),
            "reward": statistics.mean(rewards[args.warmup :]) if len(rewards) > args.warmup else float("nan"),
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- driver


CHILD_ARGS = ("data", "rows", "prompts", "samples", "new_tokens", "batch_size", "steps", "warmup", "lr", "threads")


def summarise(results: list[dict]) -> None:
    def per_step(r, key):
        if key == "step":
            return statistics.median(g + t for g, t in zip(r["gen"], r["train"], strict=True))
        if key == "peak RSS MB":
            return r["peak_rss_mb"]
        return statistics.median(r[key])

    print()
    print("per run (median over timed steps):")
    for r in results:
        steps = [round(g + t, 2) for g, t in zip(r["gen"], r["train"], strict=True)]
        print(f"  rep {r['rep']} {r['side']:>4}: step {per_step(r, 'step'):.2f}s = generation "
              f"{per_step(r, 'gen'):.2f}s + training {per_step(r, 'train'):.2f}s; mean completion "
              f"{r['completion_len']:.1f} tokens, reward {r['reward']:.3f}"
              f"{', rows skipped ' + format(r['skipped_rows'], '.1%') if 'skipped_rows' in r else ''}, peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"steps {steps}")
    ours = [r for r in results if r["side"] == "ours"]
    trl = [r for r in results if r["side"] == "trl"]
    print()
    print("| per step | ours (median) | TRL (median) | ours/TRL median | min | max |")
    print("|---|---|---|---|---|---|")
    labels = {"step": "total s", "gen": "generation s", "train": "training s", "peak RSS MB": "peak RSS MB"}
    for key, label in labels.items():
        ratios = [per_step(o, key) / per_step(t, key) for o, t in zip(ours, trl, strict=True)]
        print(f"| {label} | {statistics.median(per_step(o, key) for o in ours):.2f} | "
              f"{statistics.median(per_step(t, key) for t in trl):.2f} | {statistics.median(ratios):.2f}x | "
              f"{min(ratios):.2f}x | {max(ratios):.2f}x |")
    ratio = statistics.median(per_step(o, "step") / per_step(t, "step") for o, t in zip(ours, trl, strict=True))
    print(f"\ntarget: ours step time <= 0.6x TRL -> {'MET' if ratio <= 0.6 else 'NOT MET'} ({ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--prompts", type=int, default=2,
                        help="prompts per step (default 2 keeps the default run under ~10 min on 2 cores; 8 = 8x8x32)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="rows per training micro-batch and sampling batch; 0 = prompts x samples (one of each)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup)")
    parser.add_argument("--lr", type=float, default=1e-6)
    args = parser.parse_args()
    assert args.warmup >= 1, "the first step is always excluded"
    args.batch_size = args.batch_size or args.prompts * args.samples
    assert (args.prompts * args.samples) % args.batch_size == 0
    if args.side:
        set_threads(args.threads)
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        result["rep"] = args.rep
        print(MARK + json.dumps(result), flush=True)
        return
    if args.data != HUB_DATA and not Path(args.data).is_file():
        raise SystemExit(f"GSM8K train file not found: {args.data} (pass --data)")
    print(f"RL benchmark: {args.reps} alternating repetitions; SmolLM2-135M-Instruct float32 CPU sdpa; GSM8K train "
          f"prompts from {args.data}; {args.prompts} prompts x {args.samples} samples x <= {args.new_tokens} new "
          f"tokens per step, training micro-batch {args.batch_size}; {args.warmup} warm-up + {args.steps} timed steps; "
          f"torch threads per side: {args.threads or 'default'}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {versions()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("ours: rl.rollout_step (rollout.sample, shared-prefix prefill, per-row stop) + rl.train_on_rows, kl_coef=0")
    print("TRL : GRPOTrainer, HF generate (use_vllm=False), beta=0, num_generations=8, loss_type=dapo, use_cpu")
    results = []
    for rep in range(args.reps):
        for side in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
            result = run_child(__file__, CHILD_ARGS, side, rep, args)
            step = statistics.median(g + t for g, t in zip(result["gen"], result["train"], strict=True))
            print(f"  rep {rep} {side}: {step:.2f}s/step (generation {statistics.median(result['gen']):.2f}s, "
                  f"training {statistics.median(result['train']):.2f}s)", flush=True)
            results.append(result)
    summarise(results)


if __name__ == "__main__":
    main()
