"""Shared test helpers: a tiny random Llama, the real SmolLM2 tokenizer, and a complete small `Config`.

Stable API (other test files import it): `tiny_model(vocab_size, seed)`, `smollm2_tokenizer()`,
`save_tiny_model_dir(path, seed)`, `make_config(tmp_path, **overrides)`,
`optimizer_config(lr, **fields)`, `replace_nested(instance, fields)`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `base_config` and the package import from the repo root
    sys.path.insert(0, str(ROOT))

from integration_training.config import (  # noqa: E402
    Config,
    DataConfig,
    DatasetSpec,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    RLConfig,
    SamplingConfig,
    SFTConfig,
    TargetConfig,
)

SHARED_DATA = ROOT.parent / "shared" / "data"

# The tiny models here are dominated by small matmuls, where OpenMP's second thread costs more than it gives
# (measured: a 200x64x128 matmul took 33 ms with 2 threads on a loaded 2-core box, 0.5 ms with 1).
torch.set_num_threads(1)


def tiny_model(vocab_size: int, seed: int):
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads), float32, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (offline model provisioned on first use), cached per process."""
    from integration_training.models import load_tokenizer, provision_offline_model

    return load_tokenizer(str(provision_offline_model()))


def save_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A `save_pretrained` directory with a tiny random model and the SmolLM2 tokenizer (reused if present)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        tokenizer = smollm2_tokenizer()
        model = tiny_model(len(tokenizer), seed)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return path


def arithmetic(split: str, max_samples: int) -> DatasetSpec:
    return DatasetSpec(name="arithmetic", split=split, subset=None, max_samples=max_samples, repeat=1, path=None, reward=None)


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A complete valid Config for a fast CPU test run.

    `overrides` maps a section name (`target`, `model`, `data`, `sft`, `rl`, `evaluation`, `output`) to a dict of
    field values for that section; a nested section takes a dict of its own fields, e.g.
    `make_config(tmp_path, sft={"batch_size": 2, "optimizer": {"matrix_lr": 1e-2}}, data={"max_length": 128})`.
    Unless `evaluation` sets them, `evaluation.after_sft` / `after_rl` follow `output.mode` (what a user writes).
    """
    model_dir = save_tiny_model_dir(Path(tmp_path) / "tiny_model")
    sections: dict[str, Any] = {
        "target": TargetConfig(
            gpu_ranks=[], device_type="cpu", processes_per_node=1, parallelism="none",
            num_nodes=1, node_rank=0, master_addr="127.0.0.1", master_port=29500,
        ),
        "model": ModelConfig(
            name=str(model_dir), dtype="float32", compile=False, attn_implementation="sdpa", gradient_checkpointing=False,
            lora=None,
        ),
        "data": DataConfig(
            sft_mixture=[arithmetic("train", 16)],
            sft_val_mixture=[arithmetic("test", 4)],
            rl_mixture=[arithmetic("train", 16)],
            max_length=256,
            shuffle_seed=0,
            tools=[],
        ),
        "sft": SFTConfig(
            num_epochs=1, num_iterations=4, batch_size=2, examples_per_step=4,
            optimizer=optimizer_config(lr=1e-3), packing=False, eval_every=100, eval_steps=1, checkpoint_every=100,
            log_every=1,
        ),
        "rl": RLConfig(
            num_epochs=1, num_iterations=2, examples_per_step=2, num_samples=2, batch_size=2,
            sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, batch_size=4),
            optimizer=optimizer_config(lr=1e-5), advantage="mean", kl_coef=0.0, clip_eps=0.2, updates_per_batch=1,
            checkpoint_every=100, log_every=1,
        ),
        "evaluation": EvalConfig(
            mixture=[arithmetic("test", 8)], num_problems=4, num_samples=1,
            sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, batch_size=4),
            at_start=True, after_sft=True, after_rl=False, every_rl_steps=0,
        ),
        "output": OutputConfig(
            save_dir=Path(tmp_path) / "results", log_level="INFO", experiment_name="test", use_wandb=False,
            wandb_project="integration_training", mode="sft", source_checkpoint=None,
        ),
    }
    for name, fields in overrides.items():
        assert name in sections, f"unknown config section {name!r}; expected one of {sorted(sections)}"
        sections[name] = replace_nested(sections[name], fields)
    stages = sections["output"].mode.split("+")
    follow = {k: k.removeprefix("after_") in stages for k in ("after_sft", "after_rl")
              if k not in overrides.get("evaluation", {})}
    sections["evaluation"] = dataclasses.replace(sections["evaluation"], **follow)
    from integration_training.config import validate

    config = Config(**sections)
    validate(config)
    return config


def optimizer_config(lr: float, **fields: Any) -> OptimizerConfig:
    """AdamW at one LR for every group, constant schedule, clip 1.0; `fields` override any OptimizerConfig field."""
    base = dict(name="adamw", embedding_lr=lr, unembedding_lr=lr, matrix_lr=lr, weight_decay=0.0, init_lr_frac=1.0,
                warmup_ratio=0.0, lr_schedule="constant", grad_clip=1.0)
    return OptimizerConfig(**(base | fields))


def replace_nested(instance, fields: dict[str, Any]):
    """`dataclasses.replace`, where a dict value for a dataclass-valued field replaces inside that section."""
    changes = {}
    for name, value in fields.items():
        current = getattr(instance, name)
        nested = isinstance(value, dict) and dataclasses.is_dataclass(current)
        changes[name] = replace_nested(current, value) if nested else value
    return dataclasses.replace(instance, **changes)


def write_gsm8k_like(path: Path, count: int, seed: int) -> Path:
    """`count` JSONL rows in GSM8K's schema (question / answer ending in `#### N`), text we wrote ourselves.

    Tests that need GSM8K-shaped rows use this, so a fresh clone with nothing beside it runs them; only tests of
    the real copy (skipped when it is absent) read ../shared.
    """
    import json
    import random

    rng = random.Random(f"gsm8k-like/{seed}")
    names = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Gita", "Hugo")
    things = ("pencils", "apples", "stamps", "marbles", "books", "shells")
    lines = []
    for _ in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        boxes, each, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(0, 30)
        total = boxes * each + extra
        question = (f"{name} has {boxes} boxes with {each} {thing} in each box and {extra} loose {thing}. "
                    f"How many {thing} does {name} have?")
        answer = (f"The boxes hold {boxes}*{each} = <<{boxes}*{each}={boxes * each}>>{boxes * each} {thing}.\n"
                  f"With the loose ones that is {boxes * each}+{extra} = <<{boxes * each}+{extra}={total}>>{total}.\n"
                  f"#### {total:,}")
        lines.append(json.dumps({"question": question, "answer": answer}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def optimization(optimizer, grad_clip: float = 0.0, dist=None, scaler=None):
    """`stage.Optimization` around `optimizer` (a real one or a stand-in with `param_groups`, `step`, `zero_grad`)
    for one CPU process unless `dist` says otherwise."""
    from integration_training.distributed import Dist
    from integration_training.stage import Optimization

    dist = dist if dist is not None else Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"),
                                              is_main=True)
    return Optimization(optimizer, grad_clip=grad_clip, dist=dist, scaler=scaler)
