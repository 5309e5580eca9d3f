"""The config schema: frozen dataclasses in which no field has a default.

Imports only the standard library so that loading and validating a config is instant and never touches torch.

Two layers of checking:
- construction: every dataclass refuses missing and unknown fields, naming all of them at once (`ConfigError`);
- `validate(config)`: types, ranges and cross-field rules over the whole tree, every problem collected and
  reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path


class ConfigError(Exception):
    """One or more problems in a config; `problems` lists each as 'field.path: what is wrong and the fix'."""

    def __init__(self, problems: list[str]):
        assert problems, "a ConfigError needs at least one problem"
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        header = f"invalid config ({count} problem{'s' if count > 1 else ''}):"
        return "\n".join([header] + [f"  - {p}" for p in self.problems])


def _schema(cls):
    """Make `cls` a frozen keyword-only dataclass whose constructor names every missing and unknown field."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    generated_init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args, **kwargs):
        problems = []
        if args:
            problems.append(f"{cls.__name__}: pass every field by keyword (got {len(args)} positional value(s))")
        for name in names:
            if name not in kwargs:
                problems.append(f"{cls.__name__}.{name}: missing (no field has a default; write it explicitly)")
        for name in kwargs:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(names)}"
                problems.append(f"{cls.__name__}.{name}: unknown field{hint}")
        if problems:
            raise ConfigError(problems)
        generated_init(self, **kwargs)

    cls.__init__ = __init__
    return cls


@_schema
class TargetConfig:
    gpu_ranks: list[int]  # physical GPU ids; sets CUDA_VISIBLE_DEVICES; [] on cpu/mps
    device_type: str  # "cuda" | "cpu" | "mps"
    processes_per_node: int  # == len(gpu_ranks) on cuda; >= 1 on cpu (multi-process runs with gloo)
    parallelism: str  # "none" | "ddp" | "fsdp2"
    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int


@_schema
class ModelConfig:
    name: str  # HF hub id, local directory, or "offline:SmolLM2-135M-Instruct"
    dtype: str  # "float32" | "bfloat16" | "float16"
    compile: bool  # torch.compile the model for training
    attn_implementation: str  # "sdpa" | "eager" | "flash_attention_2"
    gradient_checkpointing: bool


@_schema
class DatasetSpec:
    name: str  # hub id ("openai/gsm8k", ...), "custom_json", "spelling" or "arithmetic"
    split: str
    subset: str | None  # hub config name, e.g. "main" or "ARC-Easy"
    max_samples: int | None  # seeded sample of this many rows; None = all rows
    repeat: int  # oversampling factor, >= 1
    path: str | None  # local file/dir in the hub's row schema; None = hub (or procedural)
    reward: str | None  # None = the task's own verifier; "module:function" = a custom reward


@_schema
class DataConfig:
    sft_mixture: list[DatasetSpec]
    sft_val_mixture: list[DatasetSpec]
    rl_mixture: list[DatasetSpec]
    rl_eval_mixture: list[DatasetSpec]
    max_length: int  # tokens per training sequence (SFT) and per prompt+completion budget (RL)
    shuffle_seed: int


@_schema
class SFTConfig:
    num_epochs: int
    num_iterations: int  # -1 = derived from num_epochs
    batch_size: int  # sequences per device micro-batch
    target_examples_per_step: int  # sequences per optimizer step over all ranks → gradient accumulation
    optimizer: str  # "adamw" | "muon"
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    weight_decay: float
    init_lr_frac: float  # LR multiplier at step 0 after warmup ends (nanochat: decay from this fraction)
    warmup_ratio: float
    lr_schedule: str  # "linear" | "cosine" | "constant"
    grad_clip: float  # max global grad norm; 0 = no clipping
    packing: bool
    eval_every: int
    eval_steps: int
    checkpoint_every: int
    log_every: int


@_schema
class RLConfig:
    num_epochs: int
    num_iterations: int  # -1 = derived from num_epochs
    examples_per_step: int  # prompts per optimizer step over all ranks
    num_samples: int  # completions per prompt (the group)
    device_batch_size: int  # sequences per training forward/backward on one device
    # Sequences per sampling forward (rollouts and evaluation) on one device. Sampling keeps no activations, so it
    # can be far larger than device_batch_size; on CPU decode only reaches matmul speed from a few hundred rows.
    sample_batch_size: int
    max_new_tokens: int
    temperature: float
    top_k: int  # 0 = no top-k filter
    optimizer: str
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    weight_decay: float
    init_lr_frac: float
    warmup_ratio: float
    lr_schedule: str
    grad_clip: float
    advantage: str  # "mean" (nanochat) | "mean_std" (GRPO)
    kl_coef: float  # 0 = no reference model
    clip_eps: float  # PPO ratio clip, used when updates_per_batch > 1
    updates_per_batch: int  # 1 = pure on-policy
    eval_every: int
    eval_examples: int
    eval_k: int  # samples per eval problem: pass@1 and pass@k are estimated from them
    save_every: int
    log_every: int


@_schema
class OutputConfig:
    save_dir: Path
    log_level: str  # "DEBUG" | "INFO" | "WARNING" | "ERROR"
    experiment_name: str
    use_wandb: bool
    wandb_project: str
    mode: str  # "sft" | "rl" | "sft+rl"
    source_checkpoint: str | None  # required for mode="rl"; None otherwise


@_schema
class Config:
    target: TargetConfig
    model: ModelConfig
    data: DataConfig
    sft: SFTConfig
    rl: RLConfig
    output: OutputConfig


MODES = ("sft", "rl", "sft+rl")
DEVICE_TYPES = ("cuda", "cpu", "mps")
PARALLELISMS = ("none", "ddp", "fsdp2")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("linear", "cosine", "constant")
ADVANTAGES = ("mean", "mean_std")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def runs_sft(config: Config) -> bool:
    return config.output.mode in ("sft", "sft+rl")


def runs_rl(config: Config) -> bool:
    return config.output.mode in ("rl", "sft+rl")


def world_size(target: TargetConfig) -> int:
    return target.processes_per_node * target.num_nodes


def run_dir(config: Config) -> Path:
    return Path(config.output.save_dir) / config.output.experiment_name


# ---------------------------------------------------------------------------------------------------- types


def _type_problems(value, annotation, where: str) -> list[str]:
    """Check `value` against a field annotation; returns problems (empty when it fits)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return []
        non_none = [o for o in options if o is not type(None)]
        assert len(non_none) == 1, f"schema unions are 'X | None' only, got {annotation}"
        if value is None:
            return [f"{where}: must not be None"]
        return _type_problems(value, non_none[0], where)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__} {value!r}"]
        (item_type,) = typing.get_args(annotation)
        problems = []
        for index, item in enumerate(value):
            problems += _type_problems(item, item_type, f"{where}[{index}]")
        return problems
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, annotation):
            return [f"{where}: expected {annotation.__name__}(...), got {type(value).__name__}"]
        return _dataclass_type_problems(value, where)
    if annotation is bool:
        return [] if isinstance(value, bool) else [f"{where}: expected True/False, got {value!r}"]
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer, got {value!r}"]
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if annotation is str:
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if annotation is Path:
        return [] if isinstance(value, Path) else [f"{where}: expected a pathlib.Path, got {value!r}"]
    raise AssertionError(f"unsupported schema annotation {annotation}")


def _dataclass_type_problems(instance, where: str) -> list[str]:
    hints = typing.get_type_hints(type(instance))
    problems = []
    for field in dataclasses.fields(instance):
        problems += _type_problems(getattr(instance, field.name), hints[field.name], f"{where}.{field.name}")
    return problems


# ---------------------------------------------------------------------------------------------------- ranges


def _one_of(value, allowed, where) -> list[str]:
    return [] if value in allowed else [f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"]


def _at_least(value, low, where) -> list[str]:
    return [] if value >= low else [f"{where}: must be >= {low}, got {value!r}"]


def _in_range(value, low, high, where) -> list[str]:
    return [] if low <= value <= high else [f"{where}: must be in [{low}, {high}], got {value!r}"]


def _target_problems(t: TargetConfig) -> list[str]:
    p = _one_of(t.device_type, DEVICE_TYPES, "target.device_type")
    p += _one_of(t.parallelism, PARALLELISMS, "target.parallelism")
    p += _at_least(t.processes_per_node, 1, "target.processes_per_node")
    p += _at_least(t.num_nodes, 1, "target.num_nodes")
    p += _in_range(t.master_port, 1, 65535, "target.master_port")
    if not t.master_addr:
        p.append("target.master_addr: must not be empty (use '127.0.0.1' for one node)")
    if not 0 <= t.node_rank < max(t.num_nodes, 1):
        p.append(f"target.node_rank: must be in [0, num_nodes={t.num_nodes}), got {t.node_rank}")
    if t.device_type in ("cpu", "mps") and t.gpu_ranks:
        p.append(f"target.gpu_ranks: must be [] for device_type={t.device_type!r}, got {t.gpu_ranks}")
    if t.device_type == "cuda":
        if not t.gpu_ranks:
            p.append("target.gpu_ranks: device_type='cuda' needs at least one GPU id, e.g. [0]")
        if len(set(t.gpu_ranks)) != len(t.gpu_ranks) or any(r < 0 for r in t.gpu_ranks):
            p.append(f"target.gpu_ranks: ids must be distinct and >= 0, got {t.gpu_ranks}")
        if t.processes_per_node != len(t.gpu_ranks):
            p.append(
                f"target.processes_per_node: must equal len(gpu_ranks)={len(t.gpu_ranks)} on cuda "
                f"(one process per GPU), got {t.processes_per_node}"
            )
    if t.device_type == "mps" and (t.processes_per_node != 1 or t.num_nodes != 1):
        p.append("target.processes_per_node/num_nodes: mps runs a single process on one node")
    world = t.processes_per_node * t.num_nodes
    if world > 1 and t.parallelism == "none":
        p.append(f"target.parallelism: {world} processes need 'ddp' or 'fsdp2', got 'none'")
    if world == 1 and t.parallelism != "none":
        p.append(f"target.parallelism: a single process must use 'none', got {t.parallelism!r}")
    return p


def _model_problems(m: ModelConfig, t: TargetConfig) -> list[str]:
    p = _one_of(m.dtype, DTYPES, "model.dtype")
    p += _one_of(m.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")
    if not m.name:
        p.append("model.name: must not be empty")
    if m.attn_implementation == "flash_attention_2" and t.device_type != "cuda":
        p.append("model.attn_implementation: 'flash_attention_2' needs device_type='cuda'; use 'sdpa'")
    if m.dtype == "float16" and t.device_type == "cpu":
        p.append("model.dtype: float16 is not supported for training on cpu; use 'float32'")
    if m.dtype == "float16" and t.parallelism == "fsdp2":
        # GradScaler's overflow check is per rank; with sharded gradients ranks could disagree on skipping a step.
        p.append("model.dtype: float16 needs a loss scale that FSDP2 shards cannot agree on here; use 'bfloat16' "
                 "(or parallelism='ddp')")
    return p


def _dataset_problems(spec: DatasetSpec, where: str) -> list[str]:
    p = []
    if not spec.name:
        p.append(f"{where}.name: must not be empty")
    if not spec.split:
        p.append(f"{where}.split: must not be empty")
    if spec.max_samples is not None:
        p += _at_least(spec.max_samples, 1, f"{where}.max_samples")
    p += _at_least(spec.repeat, 1, f"{where}.repeat")
    if spec.reward is not None and spec.reward.count(":") != 1:
        p.append(f"{where}.reward: must be 'module:function' or None, got {spec.reward!r}")
    return p


def _data_problems(d: DataConfig, mode: str) -> list[str]:
    p = _at_least(d.max_length, 16, "data.max_length")
    for field in ("sft_mixture", "sft_val_mixture", "rl_mixture", "rl_eval_mixture"):
        for index, spec in enumerate(getattr(d, field)):
            p += _dataset_problems(spec, f"data.{field}[{index}]")
    needed = {"sft": ("sft_mixture", "sft_val_mixture"), "rl": ("rl_mixture", "rl_eval_mixture")}
    for stage, fields in needed.items():
        if stage in mode.split("+"):
            for field in fields:
                if not getattr(d, field):
                    p.append(f"data.{field}: must list at least one DatasetSpec when output.mode={mode!r}")
    return p


def _optimizer_problems(s, where: str) -> list[str]:
    p = _one_of(s.optimizer, OPTIMIZERS, f"{where}.optimizer")
    p += _one_of(s.lr_schedule, LR_SCHEDULES, f"{where}.lr_schedule")
    for field in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"):
        p += _at_least(getattr(s, field), 0.0, f"{where}.{field}")
    if not 0.0 < s.init_lr_frac <= 1.0:
        p.append(f"{where}.init_lr_frac: must be in (0, 1], got {s.init_lr_frac!r}")
    if not 0.0 <= s.warmup_ratio < 1.0:
        p.append(f"{where}.warmup_ratio: must be in [0, 1), got {s.warmup_ratio!r}")
    p += _at_least(s.num_epochs, 1, f"{where}.num_epochs")
    if s.num_iterations != -1 and s.num_iterations < 1:
        p.append(f"{where}.num_iterations: must be -1 (derive from num_epochs) or >= 1, got {s.num_iterations}")
    p += _at_least(s.log_every, 1, f"{where}.log_every")
    p += _at_least(s.eval_every, 1, f"{where}.eval_every")
    return p


def _sft_problems(s: SFTConfig, world: int) -> list[str]:
    p = _optimizer_problems(s, "sft")
    p += _at_least(s.batch_size, 1, "sft.batch_size")
    p += _at_least(s.target_examples_per_step, 1, "sft.target_examples_per_step")
    p += _at_least(s.eval_steps, 1, "sft.eval_steps")
    p += _at_least(s.checkpoint_every, 1, "sft.checkpoint_every")
    per_pass = s.batch_size * world
    if s.batch_size >= 1 and s.target_examples_per_step % per_pass != 0:
        p.append(
            f"sft.target_examples_per_step: {s.target_examples_per_step} is not divisible by "
            f"batch_size × world_size = {s.batch_size} × {world} = {per_pass}; pick a multiple of {per_pass}"
        )
    return p


def _rl_problems(r: RLConfig, world: int) -> list[str]:
    p = _optimizer_problems(r, "rl")
    p += _one_of(r.advantage, ADVANTAGES, "rl.advantage")
    for field in ("examples_per_step", "num_samples", "device_batch_size", "sample_batch_size", "max_new_tokens",
                  "updates_per_batch"):
        p += _at_least(getattr(r, field), 1, f"rl.{field}")
    for field in ("eval_examples", "eval_k", "save_every"):
        p += _at_least(getattr(r, field), 1, f"rl.{field}")
    p += _at_least(r.temperature, 0.0, "rl.temperature")
    p += _at_least(r.top_k, 0, "rl.top_k")
    p += _at_least(r.kl_coef, 0.0, "rl.kl_coef")
    if r.clip_eps <= 0:
        p.append(f"rl.clip_eps: must be > 0, got {r.clip_eps!r}")
    if r.num_samples < 2:
        p.append("rl.num_samples: the group-mean baseline needs at least 2 samples per prompt")
    if r.temperature == 0:
        p.append("rl.temperature: 0 makes every sample of a group identical (no learning signal); use > 0")
    if r.examples_per_step >= 1 and r.examples_per_step % world != 0:
        p.append(
            f"rl.examples_per_step: {r.examples_per_step} prompts cannot be split evenly over {world} processes; "
            f"pick a multiple of {world}"
        )
    elif r.examples_per_step >= 1 and r.device_batch_size >= 1:
        rows = (r.examples_per_step // world) * r.num_samples
        if rows % r.device_batch_size != 0:
            p.append(
                f"rl.device_batch_size: {r.device_batch_size} does not divide the {rows} sequences per process per "
                f"step (examples_per_step / world_size × num_samples); pick a divisor of {rows}"
            )
    return p


def _output_problems(o: OutputConfig) -> list[str]:
    p = _one_of(o.mode, MODES, "output.mode")
    p += _one_of(o.log_level, LOG_LEVELS, "output.log_level")
    if not o.experiment_name or "/" in o.experiment_name or o.experiment_name in (".", ".."):
        p.append(f"output.experiment_name: must be a plain folder name, got {o.experiment_name!r}")
    if o.use_wandb and not o.wandb_project:
        p.append("output.wandb_project: must not be empty when use_wandb=True")
    if o.mode == "rl" and o.source_checkpoint is None:
        p.append("output.source_checkpoint: mode='rl' needs the model to start from (an HF dir or a run checkpoint)")
    if o.mode in ("sft", "sft+rl") and o.source_checkpoint is not None:
        p.append(
            f"output.source_checkpoint: must be None for mode={o.mode!r} "
            "(sft starts from model.name; sft+rl hands SFT's final checkpoint to RL)"
        )
    return p


def validate(config: Config) -> None:
    """Raise ConfigError listing every problem in `config`; return None when it is valid."""
    problems = _type_problems(config, Config, "config")
    if problems:  # range checks assume the types are right
        raise ConfigError([p.removeprefix("config.") for p in problems])
    world = world_size(config.target)
    problems = _target_problems(config.target)
    problems += _model_problems(config.model, config.target)
    problems += _data_problems(config.data, config.output.mode)
    problems += _sft_problems(config.sft, world)
    problems += _rl_problems(config.rl, world)
    problems += _output_problems(config.output)
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------------- JSON


def to_dict(config: Config) -> dict:
    """A JSON-ready dict (Paths as strings)."""

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(config)


def from_dict(data: dict) -> Config:
    """Inverse of `to_dict`; missing/unknown keys raise ConfigError naming them."""
    return _build(Config, data, "config")


def _build(annotation, value, where: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _build(inner, value, where)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError([f"{where}: expected a list, got {value!r}"])
        return [_build(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError([f"{where}: expected an object for {annotation.__name__}, got {value!r}"])
        hints = typing.get_type_hints(annotation)
        kwargs = {k: (_build(hints[k], v, f"{where}.{k}") if k in hints else v) for k, v in value.items()}
        return annotation(**kwargs)
    if annotation is Path:
        return Path(value) if isinstance(value, str) else value
    return value


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=False)


def from_json(text: str) -> Config:
    return from_dict(json.loads(text))
