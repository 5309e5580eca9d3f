"""LoRA vs full fine-tune on SmolLM2-135M, CPU: optimizer state, RL-with-KL peak RSS, sampling unmerged vs merged.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_lora.py [--only sampling ...]

Each measurement whose number is a process-wide peak (RSS) runs in its own subprocess. LoRA here is the shipped
configs/03_offline_lora.py adapter (r=16, alpha=32, all linear layers).
- optimizer state: bytes of the AdamW state tensors after one step, LoRA vs full (the `≤ 5 %` of issue 20);
- RL step with kl_coef > 0: peak RSS of a process that loads the policy (+ the reference copy for the full
  fine-tune; the adapters-off policy for LoRA) and runs one `train_on_rows` over 16 fixed rows;
- sampling: `rollout.sample` with the adapters unmerged vs inside `lora.merged_for_sampling` (what RL does; the
  merge and the restore are inside the timing), at the shapes of one RL rollout and of an evaluation slice,
  alternated in one process, best of 3.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from integration_training.config import LoRAConfig, ModelConfig  # noqa: E402

LORA = LoRAConfig(r=16, alpha=32.0, dropout=0.0, target_modules=["all-linear"])


def model_config(lora: LoRAConfig | None) -> ModelConfig:
    return ModelConfig(name="offline:SmolLM2-135M-Instruct", dtype="float32", compile=False,
                       attn_implementation="sdpa", gradient_checkpointing=False, lora=lora)


def load(lora: LoRAConfig | None):
    from integration_training import lora as lora_module
    from integration_training.models import load_model, resolve_model_path

    model = load_model(resolve_model_path("offline:SmolLM2-135M-Instruct"), "float32", "sdpa", torch.device("cpu"),
                       training=True)
    return model, lora_module.prepare(model, model_config(lora), None, 0)


def rl_stage():
    import runpy

    return runpy.run_path(str(ROOT / "configs" / "03_offline_lora.py"))["config"].rl


def optimizer_state_bytes(with_lora: bool) -> int:
    from integration_training.optim import build_optimizer

    model, _ = load(LORA if with_lora else None)
    optimizer = build_optimizer(model, rl_stage().optimizer)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.numel() > 1)


def rows(count: int):
    from integration_training.rl import Sequence_

    generator = torch.Generator().manual_seed(0)
    out = []
    for p in range(count // 8):
        prompt = torch.randint(10, 40000, (60,), generator=generator).tolist()
        for s in range(8):
            completion = torch.randint(10, 40000, (24,), generator=generator).tolist()
            out.append(Sequence_(prompt, completion, [-1.0] * 24, 1.0 if s % 2 else -1.0, 0.0))
    return out


def rl_peak_rss(with_lora: bool) -> dict:
    """Runs in a fresh process: load policy (+ reference), one RL step with kl_coef > 0; peak RSS in MiB."""
    from integration_training.distributed import Dist
    from integration_training.optim import build_optimizer
    from integration_training.rl import PolicyModels, load_reference, train_on_rows
    from integration_training.stage import Optimization

    import dataclasses

    stage = dataclasses.replace(rl_stage(), kl_coef=0.1)
    model, adapters = load(LORA if with_lora else None)
    model.train()
    if adapters is None:
        reference = load_reference("offline:SmolLM2-135M-Instruct", model_config(None), torch.device("cpu"))
    else:
        reference = adapters.reference()
    optimizer = build_optimizer(model, stage.optimizer)
    dist = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    start = time.perf_counter()
    train_on_rows(PolicyModels.of(model, reference, model_config(None)),
                  Optimization(optimizer, grad_clip=stage.optimizer.grad_clip, dist=dist), rows(16), rl=stage, pad_id=0)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_seconds": time.perf_counter() - start}


SAMPLING_SHAPES = {  # name: (prompts, samples per prompt, greedy first), 24 new tokens, one chunk of rows each
    "rl_step": (8, 8, False),  # one RL rollout of configs/03_offline_lora.py: 8 prompts x 8 samples = 64 rows
    "eval_chunk": (48, 4, True),  # a slice of its evaluation: 3 samples + greedy per problem = 192 rows
}


def sampling_seconds() -> dict:
    """Seconds per sampling call, adapters unmerged vs `lora.merged_for_sampling` (merge + restore included),
    alternated in one process, best of 3; and whether both give the same completions."""
    from integration_training import lora as lora_module
    from integration_training.rollout import SamplingSettings, SpecialTokens, sample

    model, adapters = load(LORA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.trainable():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)  # B != 0, as after training
    result: dict = {}
    for shape, (num_prompts, num_samples, greedy_first) in SAMPLING_SHAPES.items():
        prompts = [torch.randint(10, 40000, (80,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(num_prompts)]

        def run(merged: bool):
            with lora_module.merged_for_sampling(model, sharded=False) if merged else contextlib.nullcontext():
                return sample(model, prompts, num_samples=num_samples,
                              settings=SamplingSettings(max_new_tokens=24, temperature=1.0, top_k=0, batch_size=500),
                              special=SpecialTokens(stop_ids=frozenset(), pad_id=0),
                              generator=torch.Generator().manual_seed(0), greedy_first=greedy_first)

        run(False)  # warm-up (allocator, thread pool)
        timings, outputs = {"unmerged": float("inf"), "merged": float("inf")}, {}
        for _ in range(3):  # alternated, best of 3: the machine is shared, load changes minute to minute
            for name in ("unmerged", "merged"):
                start = time.perf_counter()
                outputs[name] = run(name == "merged")
                timings[name] = min(timings[name], time.perf_counter() - start)
        pairs = [(a, b) for ga, gb in zip(outputs["unmerged"], outputs["merged"]) for a, b in zip(ga, gb)]
        result[shape] = timings | {
            "rows": num_prompts * num_samples,
            "same_completions": sum(a.token_ids == b.token_ids for a, b in pairs),
            "max_logprob_diff": max(abs(x - y) for a, b in pairs if a.token_ids == b.token_ids
                                    for x, y in zip(a.logprobs, b.logprobs)),
        }
    start = time.perf_counter()
    for _ in range(3):
        with lora_module.merged_for_sampling(model, sharded=False):
            pass
    result["merge_and_restore_seconds"] = (time.perf_counter() - start) / 3
    return result


def child(kind: str) -> None:
    torch.set_num_threads(2)
    if kind == "optimizer":
        result = {"full": optimizer_state_bytes(False), "lora": optimizer_state_bytes(True)}
    elif kind.startswith("rss_"):
        result = rl_peak_rss(kind == "rss_lora")
    else:
        assert kind == "sampling"
        result = sampling_seconds()
    print(json.dumps(result))


KINDS = ("optimizer", "rss_full", "rss_lora", "sampling")


def main(kinds: list[str]) -> None:
    results = {}
    for kind in kinds:
        output = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True,
                                check=True, cwd=ROOT)
        results[kind] = json.loads(output.stdout.strip().splitlines()[-1])
        print(kind, results[kind], flush=True)
    if "optimizer" in results:
        opt = results["optimizer"]
        print(f"optimizer state: LoRA {opt['lora'] / 2**20:.1f} MiB vs full {opt['full'] / 2**20:.1f} MiB "
              f"= {opt['lora'] / opt['full']:.2%}")
    if "rss_lora" in results and "rss_full" in results:
        print(f"RL step with KL, peak RSS: LoRA {results['rss_lora']['peak_rss_mib']:.0f} MiB vs full + reference "
              f"copy {results['rss_full']['peak_rss_mib']:.0f} MiB")
    if "sampling" in results:
        s = results["sampling"]
        for shape in SAMPLING_SHAPES:
            r = s[shape]
            print(f"sampling {shape} ({r['rows']} rows x 24 tokens): unmerged {r['unmerged']:.2f} s, merged "
                  f"{r['merged']:.2f} s (unmerged/merged = {r['unmerged'] / r['merged']:.2f}x); identical "
                  f"completions {r['same_completions']}/{r['rows']}, max |logprob diff| {r['max_logprob_diff']:.1e}")
        print(f"merge + restore alone: {s['merge_and_restore_seconds']:.2f} s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS), help="measurements to run")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
    else:
        main(args.only)
