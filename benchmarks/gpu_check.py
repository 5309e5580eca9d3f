"""The prepared GPU check: bf16 training throughput, bf16-vs-fp32 loss curves, RL decode and train step — one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json                    # on a GPU: Qwen2.5-0.5B shape, ≤ 8 min
    python benchmarks/gpu_check.py --profile tiny --device cpu --out x.json   # CPU smoke run (the test suite's)

Everything runs the product's own code (SupervisedTokenLoss + train_step, packing collation, rollout.sample,
rl.train_on_rows) on a random init of a shape shipped in benchmarks/shapes/ (weights cannot travel to the GPU
machine; throughput and memory do not depend on the values). Sections:
- sft: tokens/s, MFU and peak memory of bf16 SFT steps (fp32 masters + autocast, fused AdamW) on packed rows of
  2048 and 8192 tokens, per attention backend present (sdpa always; flash_attention_2 when flash_attn imports);
- curves: the same learnable copy task trained ~100 steps in float32, in bf16 with fp32 masters (ours), and in
  pure bf16 parameters (what the project did before); the final loss drop of each;
- rl: decode tokens/s of `rollout.sample` vs HF `generate` at 64 and 256 rows (same model, same autocast), and one
  RL train step (time, peak memory, sampler-vs-trainer log-prob mismatch) with gradient checkpointing off and on.

MFU = model FLOPs / (time × peak bf16 dense FLOP/s), model FLOPs per token = 6 × (matmul weights incl. LM head)
+ 12 × layers × hidden × mean attended context (causal, within each packed document). Peak: 989.4 TFLOP/s for
H100/H200 SXM (dense bf16); unknown devices report MFU as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from integration_training import optim, precision, template  # noqa: E402
from integration_training.distributed import Dist  # noqa: E402
from integration_training.models import enable_activation_checkpointing  # noqa: E402
from integration_training.rl import PolicyModels, Sequence_, train_on_rows  # noqa: E402
from integration_training.rollout import SamplingSettings, SpecialTokens, left_pad, sample  # noqa: E402
from integration_training.sft import SupervisedTokenLoss, train_step  # noqa: E402
from integration_training.stage import Optimization  # noqa: E402

NO_STOPS = SpecialTokens(stop_ids=frozenset(), pad_id=0)  # decode speed: every row runs to max_new_tokens

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


@dataclasses.dataclass(frozen=True)
class Profile:
    shape: str  # a file in benchmarks/shapes/
    sft_lengths: tuple[int, ...]  # tokens per packed row
    sft_tokens_per_micro: int  # tokens per micro-batch (rows = this // length)
    sft_micro_per_step: int
    sft_steps: int  # measured steps (after 2 warm-up steps)
    curve_steps: int
    curve_rows: int
    curve_half: int  # tokens to copy
    curve_lr: float
    decode_prompts: tuple[int, ...]  # prompts × 8 samples = rows
    prompt_len: int
    new_tokens: int


PROFILES = {
    "gpu": Profile(shape="qwen2.5-0.5b", sft_lengths=(2048, 8192), sft_tokens_per_micro=8192, sft_micro_per_step=2,
                   sft_steps=5, curve_steps=100, curve_rows=16, curve_half=48, curve_lr=1e-5,
                   decode_prompts=(8, 32), prompt_len=128, new_tokens=256),
    "tiny": Profile(shape="tiny", sft_lengths=(128, 256), sft_tokens_per_micro=256, sft_micro_per_step=2,
                    sft_steps=2, curve_steps=30, curve_rows=8, curve_half=12, curve_lr=1e-3,
                    decode_prompts=(2, 4), prompt_len=12, new_tokens=8),
}
SAMPLES = 8


# ---------------------------------------------------------------------------------------------------- helpers


def build_model(shape: str, device: torch.device, attn: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((REPO / "benchmarks" / "shapes" / f"{shape}.json").read_text())
    model_type = spec.pop("model_type")
    spec.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def optimizer_for(model, lr: float):
    settings = SimpleNamespace(name="adamw", embedding_lr=lr, unembedding_lr=lr, matrix_lr=lr, weight_decay=0.0)
    return optim.build_optimizer(model, settings)


def matmul_params(model) -> int:
    """Weights that take part in a matmul per token: every 2-D weight of the layers, plus the LM head."""
    layers = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n)
    head = model.get_output_embeddings().weight.numel()
    return layers + head


def single(device: torch.device) -> Dist:
    return Dist(rank=0, local_rank=0, world_size=1, device=device, is_main=True)


# ---------------------------------------------------------------------------------------------------- SFT throughput


def packed_rows(length: int, rows: int, vocab: int, rng: random.Random) -> list[list[template.Rendered]]:
    """`rows` rows of exactly `length` tokens, each packed with documents of 1/8 to 1/2 of the row."""
    out = []
    for _ in range(rows):
        row, left = [], length
        while left > 0:
            n = min(left, rng.randint(max(2, length // 8), max(2, length // 2)))
            ids = [rng.randrange(3, vocab) for _ in range(n)]
            row.append(template.Rendered(input_ids=ids, loss_mask=[0] + [1] * (n - 1)))
            left -= n
        out.append(row)
    return out


def mean_context(rows: list[list[template.Rendered]]) -> float:
    """Mean number of keys each token attends to (causal, within its document)."""
    total = sum(n * (n + 1) / 2 for row in rows for n in (len(r) for r in row))
    return total / sum(len(r) for row in rows for r in row)


def sft_throughput(profile: Profile, device: torch.device, attn: str, length: int, compile_model: bool,
                   lora_rank: int | None = None) -> dict:
    model = build_model(profile.shape, device, attn, seed=0)
    if lora_rank is not None:  # the product's LoRA path: peft adapters on every linear layer but the LM head
        from integration_training import lora
        from integration_training.config import LoRAConfig

        settings = LoRAConfig(r=lora_rank, alpha=2.0 * lora_rank, dropout=0.0, target_modules=["all-linear"])
        lora.prepare(model, SimpleNamespace(lora=settings), None, 0)
    optimizer = optimizer_for(model, 1e-5)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    module = SupervisedTokenLoss(model, "bfloat16", lm_head_shortcut=True)
    if compile_model:  # what model.compile=True does in the SFT stage
        module = torch.compile(module, dynamic=True)
    rng = random.Random(0)
    per_micro = max(1, profile.sft_tokens_per_micro // length)
    vocab = model.config.vocab_size
    steps_rows = [[packed_rows(length, per_micro, vocab, rng) for _ in range(profile.sft_micro_per_step)]
                  for _ in range(profile.sft_steps + 2)]
    dist = single(device)
    reset_peak(device)
    times, losses = [], []
    for step_rows in steps_rows:
        micro = [template.collate_packed(rows, length, 0, attn) for rows in step_rows]
        tokens = sum(len(r) for rows in step_rows for row in rows for r in row)
        sync(device)
        start = time.perf_counter()
        result = train_step(module, Optimization(optimizer, grad_clip=1.0, dist=dist), micro, tokens=tokens,
                            lr_multiplier=1.0)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(result.loss)
    measured = times[2:]
    seconds = sum(measured) / len(measured)
    tokens = sum(len(r) for rows in steps_rows[-1] for row in rows for r in row)
    ctx = mean_context([row for rows in steps_rows[-1] for row in rows])
    cfg = model.config
    flops_per_token = 6 * matmul_params(model) + 12 * cfg.num_hidden_layers * cfg.hidden_size * ctx
    peak = peak_tflops(device)
    achieved = flops_per_token * tokens / seconds / 1e12
    out = {
        "attn": attn, "compile": compile_model, "lora_rank": lora_rank,
        "trainable_parameters": sum(p.numel() for p in params),
        "optimizer_state_gib": round(sum(t.numel() * t.element_size() for st in optimizer.state.values()
                                         for t in st.values() if torch.is_tensor(t)) / 2**30, 3),
        "tokens_per_row": length, "rows_per_micro": per_micro, "micro_per_step": profile.sft_micro_per_step,
        "tokens_per_step": tokens, "seconds_per_step": round(seconds, 4), "tokens_per_s": round(tokens / seconds),
        "model_tflops": round(achieved, 1), "mfu": round(achieved / peak, 3) if peak else None,
        "mean_attended_context": round(ctx, 1), "peak_memory_gib": peak_gib(device),
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
        "first_step_seconds": round(times[0], 2),
    }
    del model, optimizer, module
    return out


# ---------------------------------------------------------------------------------------------------- loss curves


def copy_batch(profile: Profile, vocab: int, rng: random.Random) -> template.Batch:
    """Rows of [random half | separator | the same half]; only the copy is supervised — learnable by attention."""
    rows = []
    for _ in range(profile.curve_rows):
        half = [rng.randrange(10, min(vocab, 200)) for _ in range(profile.curve_half)]
        ids = half + [1] + half
        rows.append(template.Rendered(input_ids=ids, loss_mask=[0] * (profile.curve_half + 1) + [1] * profile.curve_half))
    return template.collate_padded(rows, 0)


def curve(profile: Profile, device: torch.device, variant: str) -> list[float]:
    """Loss per step. float32: fp32 everything; bf16_masters: ours; pure_bf16: bf16 parameters updated in place."""
    model = build_model(profile.shape, device, "sdpa", seed=1)
    compute = "float32" if variant == "float32" else "bfloat16"
    if variant == "pure_bf16":
        model = model.to(torch.bfloat16)
        compute = "float32"  # no autocast: the parameters themselves are bf16
    optimizer = optimizer_for(model, profile.curve_lr)
    module = SupervisedTokenLoss(model, compute, lm_head_shortcut=True)
    rng = random.Random(2)
    dist = single(device)
    losses = []
    for _ in range(profile.curve_steps):
        batch = copy_batch(profile, model.config.vocab_size, rng)
        result = train_step(module, Optimization(optimizer, grad_clip=1.0, dist=dist), [batch], tokens=0,
                            lr_multiplier=1.0)
        losses.append(result.loss)
    del model, optimizer, module
    return losses


def curves(profile: Profile, device: torch.device) -> dict:
    out: dict = {"lr": profile.curve_lr, "steps": profile.curve_steps, "task": "copy", "variants": {}}
    for variant in ("float32", "bf16_masters", "pure_bf16"):
        losses = curve(profile, device, variant)
        window = max(1, len(losses) // 10)
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        out["variants"][variant] = {"every_10": [round(x, 4) for x in losses[::10]], "first": round(first, 4),
                                    "last": round(last, 4), "drop": round(first - last, 4)}
    fp32_drop = out["variants"]["float32"]["drop"]
    for variant in ("bf16_masters", "pure_bf16"):
        drop = out["variants"][variant]["drop"]
        out["variants"][variant]["drop_vs_float32"] = round(drop / fp32_drop, 3) if fp32_drop > 0 else None
    return out


# ---------------------------------------------------------------------------------------------------- RL


def decode_speed(model, device: torch.device, prompts: list[list[int]], new_tokens: int, weights: str) -> dict:
    from transformers import GenerationConfig

    rows = len(prompts) * SAMPLES
    gen = torch.Generator(device=device).manual_seed(0)
    with precision.autocast(device, "bfloat16"):
        warm = SamplingSettings(max_new_tokens=2, temperature=1.0, top_k=0, batch_size=rows)
        sample(model, prompts[:1], num_samples=2, settings=warm, special=NO_STOPS, generator=gen, greedy_first=False)
        sync(device)
        start = time.perf_counter()
        settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, top_k=0, batch_size=rows)
        ours = sample(model, prompts, num_samples=SAMPLES, settings=settings, special=NO_STOPS, generator=gen,
                      greedy_first=False)
        sync(device)
        ours_s = time.perf_counter() - start
        ids, mask, _ = left_pad(prompts, 0, device)
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, num_return_sequences=SAMPLES, pad_token_id=0,
                                  eos_token_id=None)
        with torch.inference_mode():
            model.eval()
            sync(device)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            sync(device)
            hf_s = time.perf_counter() - start
            model.train()
    produced = sum(len(c.token_ids) for group in ours for c in group)
    assert produced == rows * new_tokens, (produced, rows, new_tokens)
    return {"weights": weights, "rows": rows, "new_tokens": new_tokens, "ours_tokens_per_s": round(produced / ours_s),
            "hf_generate_tokens_per_s": round(rows * new_tokens / hf_s), "speedup": round(hf_s / ours_s, 2)}, ours


def rl_train_step(model, device: torch.device, prompts, completions, checkpointing: bool) -> dict:
    rng = random.Random(3)
    rows = [Sequence_(list(prompts[p]), list(c.token_ids), list(c.logprobs), rng.choice([-1.0, 1.0]), 0.0)
            for p, group in enumerate(completions) for c in group]
    rl_cfg = SimpleNamespace(batch_size=SAMPLES * 4, kl_coef=0.0, clip_eps=0.2, updates_per_batch=1,
                             optimizer=SimpleNamespace(grad_clip=1.0))
    model_cfg = SimpleNamespace(dtype="bfloat16", gradient_checkpointing=checkpointing)
    if checkpointing:
        enable_activation_checkpointing(model)
    else:
        model.activation_checkpointing_disable()
    model.train()
    optimizer = optimizer_for(model, 1e-6)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    stats = train_on_rows(PolicyModels.of(model, None, model_cfg),
                          Optimization(optimizer, grad_clip=rl_cfg.optimizer.grad_clip, dist=single(device)), rows,
                          rl=rl_cfg, pad_id=0)
    sync(device)
    seconds = time.perf_counter() - start
    del optimizer
    return {"gradient_checkpointing": checkpointing, "rows": len(rows), "seconds": round(seconds, 3),
            "peak_memory_gib": peak_gib(device), "logprob_mismatch": round(stats["logprob_mismatch"], 5),
            "loss": round(stats["loss"], 5)}


def rl_section(profile: Profile, device: torch.device) -> dict:
    model = build_model(profile.shape, device, "sdpa", seed=4)
    rng = random.Random(5)
    vocab = model.config.vocab_size
    out: dict = {"decode": [], "train_step": []}
    completions, prompts = None, None
    for n in profile.decode_prompts:
        prompts = [[rng.randrange(3, vocab) for _ in range(profile.prompt_len)] for _ in range(n)]
        speed, completions = decode_speed(model, device, prompts, profile.new_tokens, "fp32 masters + bf16 autocast")
        out["decode"].append(speed)
    small = profile.decode_prompts[0]
    for checkpointing in (False, True):
        out["train_step"].append(rl_train_step(model, device, prompts[:small], completions[:small], checkpointing))
    # How much of a decode step is autocast's per-op dispatch: the same model with bf16 weights (what evaluation
    # of a saved checkpoint loads).
    model.activation_checkpointing_disable()
    model.to(torch.bfloat16)
    speed, _ = decode_speed(model, device, prompts, profile.new_tokens, "bf16 weights")
    out["decode"].append(speed)
    return out


# ---------------------------------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    import importlib.util

    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="sft,curves,rl",
                        help="comma-separated, in order: sft,curves,rl,sft_compile,lora")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    device = torch.device(args.device)
    started = time.perf_counter()
    result: dict = {"profile": dataclasses.asdict(profile), "environment": environment(device)}
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    for name in sections:  # written after each section: a later failure keeps what was measured
        result[name] = SECTIONS[name](profile, device, result["environment"])
        result["seconds"] = round(time.perf_counter() - started, 1)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({name: result[name]}), flush=True)
    print(f"wrote {args.out} in {result['seconds']} s", flush=True)
    return 0


def sft_section(profile: Profile, device: torch.device, env: dict, compile_model: bool = False) -> list[dict]:
    backends = ["sdpa"] + (["flash_attention_2"] if env["flash_attn"] and device.type == "cuda" else [])
    return [sft_throughput(profile, device, attn, n, compile_model) for attn in backends for n in profile.sft_lengths]


SECTIONS = {
    "sft": sft_section,
    "curves": lambda profile, device, env: curves(profile, device),
    "rl": lambda profile, device, env: rl_section(profile, device),
    "sft_compile": lambda profile, device, env: sft_section(profile, device, env, compile_model=True)[:1],
    # LoRA vs full fine-tune at the shorter row length, in the same call (same card, same warm state).
    "lora": lambda profile, device, env: [sft_throughput(profile, device, "sdpa", profile.sft_lengths[0], False, rank)
                                          for rank in (None, 16)],
}


if __name__ == "__main__":
    raise SystemExit(main())
