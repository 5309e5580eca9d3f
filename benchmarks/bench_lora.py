"""LoRA vs full fine-tune on SmolLM2-135M, CPU: optimizer state, RL-with-KL peak RSS, sampling unmerged vs merged.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_lora.py

Each measurement whose number is a process-wide peak (RSS) runs in its own subprocess. LoRA here is the shipped
configs/03_offline_lora.py adapter (r=16, alpha=32, all linear layers).
- optimizer state: bytes of the AdamW state tensors after one step, LoRA vs full (the `≤ 5 %` of issue 20);
- RL step with kl_coef > 0: peak RSS of a process that loads the policy (+ the reference copy for the full
  fine-tune; the adapters-off policy for LoRA) and runs one `train_on_rows` over 16 fixed rows;
- sampling: `rollout.sample` of 8 prompts × 4 samples × 24 tokens with the adapters unmerged vs the same weights
  merged into a plain model (what `merge_and_unload` gives), best of 2.
"""

from __future__ import annotations

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


def sampling_seconds() -> dict:
    from integration_training import lora as lora_module
    from integration_training.rollout import SamplingSettings, SpecialTokens, sample
    from transformers import AutoModelForCausalLM

    model, adapters = load(LORA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.trainable():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)  # B ≠ 0, as after training
    merged = AutoModelForCausalLM.from_config(model.config)
    merged.load_state_dict(lora_module.merged_state(model.state_dict(), adapters.scalings()), strict=False)
    merged.tie_weights()
    merged.eval()
    prompts = [torch.randint(10, 40000, (50,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    timings, outputs = {"unmerged": float("inf"), "merged": float("inf")}, {}
    for _ in range(2):  # alternated, best of 2: the machine is shared, load changes minute to minute
        for name, m in (("unmerged", model), ("merged", merged)):
            start = time.perf_counter()
            outputs[name] = sample(m, prompts, num_samples=4, settings=SamplingSettings(max_new_tokens=24, temperature=1.0, top_k=0, batch_size=64),
                                   special=SpecialTokens(stop_ids=frozenset(), pad_id=0),
                                   generator=torch.Generator().manual_seed(0), greedy_first=True)
            timings[name] = min(timings[name], time.perf_counter() - start)
    same = sum(a.token_ids == b.token_ids for ga, gb in zip(outputs["unmerged"], outputs["merged"]) for a, b in zip(ga, gb))
    return timings | {"same_completions": same, "completions": 8 * 4}


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


def main() -> None:
    results = {}
    for kind in ("optimizer", "rss_full", "rss_lora", "sampling"):
        output = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True, check=True, cwd=ROOT)
        results[kind] = json.loads(output.stdout.strip().splitlines()[-1])
        print(kind, results[kind], flush=True)
    opt = results["optimizer"]
    print(f"optimizer state: LoRA {opt['lora'] / 2**20:.1f} MiB vs full {opt['full'] / 2**20:.1f} MiB "
          f"= {opt['lora'] / opt['full']:.2%}")
    print(f"RL step with KL, peak RSS: LoRA {results['rss_lora']['peak_rss_mib']:.0f} MiB vs full + reference copy "
          f"{results['rss_full']['peak_rss_mib']:.0f} MiB")
    s = results["sampling"]
    print(f"sampling 8×4×24: unmerged {s['unmerged']:.1f} s, merged {s['merged']:.1f} s "
          f"({s['unmerged'] / s['merged'] - 1:+.0%}); identical completions {s['same_completions']}/{s['completions']}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
    else:
        main()
