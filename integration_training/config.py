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
import math
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
        if count == 1:
            return f"invalid config: {self.problems[0]}"
        header = f"invalid config ({count} problem{'s' if count > 1 else ''}):"
        return "\n".join([header] + [f"  - {p}" for p in self.problems])


class _Missing:
    """Stands in for a field a config file left out while construction problems are being collected."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()
_MISSING_MARK = "missing (reported where it was constructed)"
# While `collecting_problems()` is active, constructors record their problems here instead of raising, so that a
# config file with mistakes in several sections is reported in full, not section by section.
_collected: list[list[str]] = []


class collecting_problems:
    """Context manager: schema constructors append their problems to `self.problems` instead of raising."""

    def __enter__(self) -> collecting_problems:
        self.problems: list[str] = []
        _collected.append(self.problems)
        return self

    def __exit__(self, *exc) -> None:
        popped = _collected.pop()
        assert popped is self.problems, "collecting_problems contexts must nest"


def _caller_line() -> str:
    """'file:line: ' of the first frame outside this module (the config file's constructor call), or ''."""
    import sys

    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (__file__, dataclasses.__file__):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: " if frame is not None else ""


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
        if problems and not _collected:
            raise ConfigError(problems)
        if problems:
            where = _caller_line()
            _collected[-1].extend(where + p for p in problems)
            kwargs = {name: kwargs.get(name, MISSING) for name in names}
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
class LoRAConfig:
    """Low-rank adapters (peft LoRA) on the model's linear layers; the base weights stay frozen."""

    r: int  # adapter rank, >= 1
    alpha: float  # scaling numerator: the adapter's update is (alpha / r) · B·A
    dropout: float  # dropout on the adapter's input during training, in [0, 1)
    # Linear modules that get adapters: names matched as peft does (a module whose name is, or ends with, ".NAME"),
    # e.g. ["q_proj", "v_proj"]; or exactly ["all-linear"]: every linear layer except the LM head. Each name must
    # match at least one linear layer of the model (checked when the model loads, and by --dry-run).
    target_modules: list[str]


@_schema
class ModelConfig:
    name: str  # HF hub id, local directory, or "offline:SmolLM2-135M-Instruct"
    dtype: str  # "float32" | "bfloat16" | "float16"
    compile: bool  # torch.compile the model for training
    attn_implementation: str  # "sdpa" | "eager" | "flash_attention_2"
    gradient_checkpointing: bool
    lora: LoRAConfig | None  # None = full fine-tune; otherwise SFT and RL train only the adapters


@_schema
class DatasetSpec:
    name: str  # hub id ("openai/gsm8k", ...), "custom_json", "spelling", "arithmetic" or "word_problems"
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
    max_length: int  # tokens per training sequence (SFT) and per prompt+completion budget (RL, evaluation)
    shuffle_seed: int
    # Tools the model may call while it writes ([] = none; known: "calculator", the `<<EXPR=RESULT>>` protocol).
    # Read by data (GSM8K keeps its calculator annotations), SFT rendering (forced spans unsupervised), rollouts,
    # RL and evaluation alike.
    tools: list[str]


@_schema
class OptimizerConfig:
    """One optimizer step's settings; SFT and RL each hold one (`sft.optimizer`, `rl.optimizer`)."""

    name: str  # "adamw" | "muon"
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    weight_decay: float
    init_lr_frac: float  # LR multiplier at step 0 after warmup ends (nanochat: decay from this fraction)
    warmup_ratio: float
    lr_schedule: str  # "linear" | "cosine" | "constant"
    grad_clip: float  # max global grad norm; 0 = no clipping


@_schema
class SamplingConfig:
    """How completions are drawn; RL's rollouts and the evaluation each hold one (`rl.sampling`, `evaluation.sampling`)."""

    max_new_tokens: int
    temperature: float  # > 0 (the evaluation adds one greedy completion per problem beside its samples)
    top_k: int  # 0 = no top-k filter
    # Sequences per sampling forward on one device. Sampling keeps no activations, so it can be far larger than a
    # training batch; on CPU decode only reaches matmul speed from a few hundred rows.
    batch_size: int


@_schema
class SFTConfig:
    num_epochs: int
    num_iterations: int  # -1 = derived from num_epochs
    batch_size: int  # sequences per device micro-batch
    examples_per_step: int  # sequences per optimizer step over all ranks → gradient accumulation
    optimizer: OptimizerConfig
    packing: bool
    eval_every: int  # validation loss (sft_val_mixture) every N steps
    eval_steps: int  # micro-batches per validation pass
    checkpoint_every: int
    log_every: int


@_schema
class RLConfig:
    num_epochs: int
    num_iterations: int  # -1 = derived from num_epochs
    examples_per_step: int  # prompts per optimizer step over all ranks
    num_samples: int  # completions per prompt (the group)
    batch_size: int  # sequences per training forward/backward on one device
    sampling: SamplingConfig  # rollouts
    optimizer: OptimizerConfig
    advantage: str  # "mean" (nanochat) | "mean_std" (GRPO)
    kl_coef: float  # 0 = no reference model
    clip_eps: float  # PPO ratio clip, used when updates_per_batch > 1
    updates_per_batch: int  # 1 = pure on-policy
    checkpoint_every: int
    log_every: int


@_schema
class EvalConfig:
    """Held-out evaluation: what is scored, how it is sampled, and when it runs."""

    mixture: list[DatasetSpec]
    num_problems: int  # the first N problems of the mixture (after dropping prompts that do not fit)
    num_samples: int  # samples per problem: pass@1 and pass@k are estimated from them (plus one greedy completion)
    sampling: SamplingConfig
    at_start: bool  # the starting model: model.name (sft, sft+rl) or output.source_checkpoint (rl)
    after_sft: bool  # SFT's final checkpoint (modes with SFT)
    after_rl: bool  # RL's final checkpoint (modes with RL)
    every_rl_steps: int  # also every N RL steps; 0 = never during RL


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
    evaluation: EvalConfig
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
LORA_ALL_LINEAR = "all-linear"


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
    """Check `value` against a field annotation; returns problems (empty when it fits).

    A float field must also be finite: NaN/inf pass every `<`/`>=` comparison one way or the other, so a range
    check alone would accept them.
    """
    if value is MISSING:
        return [f"{where}: {_MISSING_MARK}"]  # reported by the constructor; marks the field for the range layer
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
            return [f"{where}: expected a list, got {type(value).__name__} {_short(value)}"]
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
        return [] if isinstance(value, bool) else [f"{where}: expected True/False, got {_short(value)}"]
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer, got {_short(value)}"]
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{where}: expected a number, got {_short(value)}"]
        return [] if math.isfinite(value) else [f"{where}: must be a finite number, got {value!r}"]
    if annotation is str:
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {_short(value)}"]
    if annotation is Path:
        return [] if isinstance(value, Path) else [f"{where}: expected a pathlib.Path, got {_short(value)}"]
    raise AssertionError(f"unsupported schema annotation {annotation}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataclass_type_problems(instance, where: str) -> list[str]:
    hints = typing.get_type_hints(type(instance))
    problems = []
    for field in dataclasses.fields(instance):
        problems += _type_problems(getattr(instance, field.name), hints[field.name], f"{where}.{field.name}")
    return problems


# ---------------------------------------------------------------------------------------------------- ranges
#
# Each rule is a small function returning problems. Rules run one by one and a rule that trips over a value of
# the wrong type (already reported by the type layer) is skipped, so one wrong type never hides the range
# problems of other fields. Problems about a field whose type is wrong are dropped (the type message says it).

# Sources that are generated or read from one file: hub-only fields do nothing there and are refused.
PROCEDURAL_NAMES = ("arithmetic", "spelling", "word_problems")
PROCEDURAL_SPLITS = ("train", "test")
CUSTOM_JSON = "custom_json"
MIN_MAX_LENGTH = 16
MIN_PROMPT_ROOM = 16  # tokens max_length must keep for the prompt beside max_new_tokens (a chat prompt's overhead)
MAX_SEED = 2**63 - 1


def _one_of(value, allowed, where) -> list[str]:
    return [] if value in allowed else [f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"]


def _at_least(value, low, where) -> list[str]:
    return [] if value >= low else [f"{where}: must be >= {low}, got {value!r}"]


def _in_range(value, low, high, where) -> list[str]:
    return [] if low <= value <= high else [f"{where}: must be in [{low}, {high}], got {value!r}"]


def _not_blank(value: str, where: str, fix: str) -> list[str]:
    return [] if value.strip() else [f"{where}: must not be empty; {fix}"]


def _run_rules(rules) -> list[str]:
    problems = []
    for rule in rules:
        try:
            problems += rule()
        except (TypeError, AttributeError, ValueError, ZeroDivisionError):
            pass  # a wrong-typed input of this rule; the type layer names it
    return problems


def _target_rules(t: TargetConfig):
    world = lambda: t.processes_per_node * t.num_nodes  # noqa: E731
    yield lambda: _one_of(t.device_type, DEVICE_TYPES, "target.device_type")
    yield lambda: _one_of(t.parallelism, PARALLELISMS, "target.parallelism")
    yield lambda: _at_least(t.processes_per_node, 1, "target.processes_per_node")
    yield lambda: _at_least(t.num_nodes, 1, "target.num_nodes")
    yield lambda: _in_range(t.master_port, 1, 65535, "target.master_port")
    yield lambda: _not_blank(t.master_addr, "target.master_addr", "use '127.0.0.1' for one node")
    yield lambda: [] if t.master_addr == t.master_addr.strip() and " " not in t.master_addr else [
        f"target.master_addr: {t.master_addr!r} contains whitespace; write the host name or IP only"]
    yield lambda: [] if 0 <= t.node_rank < max(t.num_nodes, 1) else [
        f"target.node_rank: must be in [0, num_nodes={t.num_nodes}), got {t.node_rank}"]
    yield lambda: [] if t.device_type not in ("cpu", "mps") or not t.gpu_ranks else [
        f"target.gpu_ranks: must be [] for device_type={t.device_type!r}, got {t.gpu_ranks}"]
    yield lambda: [] if t.device_type != "cuda" or t.gpu_ranks else [
        "target.gpu_ranks: device_type='cuda' needs at least one GPU id, e.g. [0]"]
    yield lambda: [] if t.device_type != "cuda" or (
        len(set(t.gpu_ranks)) == len(t.gpu_ranks) and all(r >= 0 for r in t.gpu_ranks)) else [
        f"target.gpu_ranks: ids must be distinct and >= 0, got {t.gpu_ranks}"]
    yield lambda: [] if t.device_type != "cuda" or t.processes_per_node == len(t.gpu_ranks) else [
        f"target.processes_per_node: must equal len(gpu_ranks)={len(t.gpu_ranks)} on cuda (one process per GPU), "
        f"got {t.processes_per_node}"]
    yield lambda: [] if t.device_type != "mps" or (t.processes_per_node, t.num_nodes) == (1, 1) else [
        "target.processes_per_node: mps runs a single process on one node (processes_per_node=1, num_nodes=1)"]
    yield lambda: [] if world() < 1 or world() == 1 or t.parallelism != "none" else [
        f"target.parallelism: {world()} processes need 'ddp' or 'fsdp2', got 'none'"]
    yield lambda: [] if world() != 1 or t.parallelism == "none" else [
        f"target.parallelism: a single process must use 'none', got {t.parallelism!r}"]


def _model_rules(m: ModelConfig, t: TargetConfig):
    yield lambda: _one_of(m.dtype, DTYPES, "model.dtype")
    yield lambda: _one_of(m.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")
    yield lambda: _not_blank(m.name, "model.name", f"write a hub id, a local directory or {OFFLINE_MODEL_ID!r}")
    yield lambda: [] if m.attn_implementation != "flash_attention_2" or t.device_type == "cuda" else [
        "model.attn_implementation: 'flash_attention_2' needs device_type='cuda'; use 'sdpa'"]
    yield lambda: [] if m.dtype != "float16" or t.device_type != "cpu" else [
        "model.dtype: float16 is not supported for training on cpu; use 'float32'"]
    # GradScaler's overflow check is per rank; with sharded gradients ranks could disagree on skipping a step.
    yield lambda: [] if m.dtype != "float16" or t.parallelism != "fsdp2" else [
        "model.dtype: float16 needs a loss scale that FSDP2 shards cannot agree on here; use 'bfloat16' "
        "(or parallelism='ddp')"]


def _lora_rules(config: Config):
    """model.lora's own ranges, and Muon refused with it for each stage that runs: Muon orthogonalises a whole
    weight matrix's update; orthogonalising the factors A and B separately does not orthogonalise the update B·A."""
    lora = config.model.lora
    if lora is None:
        return
    names = lambda: lora.target_modules  # noqa: E731
    yield lambda: _at_least(lora.r, 1, "model.lora.r")
    yield lambda: [] if lora.alpha > 0 else [f"model.lora.alpha: must be > 0, got {lora.alpha!r}"]
    yield lambda: [] if 0.0 <= lora.dropout < 1.0 else [f"model.lora.dropout: must be in [0, 1), got {lora.dropout!r}"]
    yield lambda: [] if names() else [
        f"model.lora.target_modules: must name at least one module, or be [{LORA_ALL_LINEAR!r}]"]
    yield lambda: [] if LORA_ALL_LINEAR not in names() or len(names()) == 1 else [
        f"model.lora.target_modules: {LORA_ALL_LINEAR!r} already covers every linear layer; use it alone"]
    yield lambda: [f"model.lora.target_modules[{i}]: {n!r} is not a module name such as 'q_proj'"
                   for i, n in enumerate(names()) if not n or n != n.strip() or n.startswith(".") or n.endswith(".")]
    yield lambda: [] if len(set(names())) == len(names()) else [
        f"model.lora.target_modules: {names()} lists a name twice"]
    for stage, runs in (("sft", runs_sft), ("rl", runs_rl)):
        yield lambda stage=stage, runs=runs: [] if not runs(config) or getattr(config, stage).optimizer.name != "muon" else [
            f"{stage}.optimizer.name: 'muon' does not apply to LoRA adapters (model.lora is set); use name='adamw', "
            "or model.lora=None for a full fine-tune with Muon"]


OFFLINE_MODEL_ID = "offline:SmolLM2-135M-Instruct"


def _dataset_rules(spec: DatasetSpec, where: str):
    yield lambda: _not_blank(spec.name, f"{where}.name", "write a dataset name such as 'openai/gsm8k'")
    yield lambda: _not_blank(spec.split, f"{where}.split", "write a split such as 'train'")
    yield lambda: [] if spec.max_samples is None else _at_least(spec.max_samples, 1, f"{where}.max_samples")
    yield lambda: _at_least(spec.repeat, 1, f"{where}.repeat")
    yield lambda: [] if spec.subset is None or spec.subset.strip() else [
        f"{where}.subset: must be None or a hub config name, got {spec.subset!r}"]
    yield lambda: [] if spec.path is None or spec.path.strip() else [
        f"{where}.path: must be None or a file/directory path, got {spec.path!r}"]
    yield lambda: [] if spec.reward is None or _is_module_function(spec.reward) else [
        f"{where}.reward: must be None (the task's own verifier) or 'module:function', got {spec.reward!r}"]
    generated = spec.name in PROCEDURAL_NAMES
    yield lambda: [] if not generated or spec.path is None else [
        f"{where}.path: {spec.name!r} is generated procedurally and reads no file; set path=None"]
    yield lambda: [] if not generated or spec.max_samples is not None else [
        f"{where}.max_samples: {spec.name!r} is procedural and unbounded; set max_samples to how many rows"]
    yield lambda: [] if not generated or spec.split in PROCEDURAL_SPLITS else [
        f"{where}.split: {spec.name!r} has splits 'train' and 'test', not {spec.split!r}"]
    yield lambda: [] if spec.name not in (*PROCEDURAL_NAMES, CUSTOM_JSON) or spec.subset is None else [
        f"{where}.subset: {spec.name!r} has no subsets (hub datasets only); set subset=None"]
    yield lambda: [] if spec.name != CUSTOM_JSON or spec.path is not None else [
        f"{where}.path: custom_json needs path= a JSONL file of conversations"]


def _is_module_function(text: str) -> bool:
    module, colon, function = text.partition(":")
    return bool(colon) and all(part.isidentifier() for part in module.split(".")) and function.isidentifier()


def _tools_problems(tools: list[str]) -> list[str]:
    from integration_training.tools import validate_tools  # stdlib only

    return [f"data.tools: {problem}; use [] for none or ['calculator']" for problem in validate_tools(tools)]


def _mixture_rules(specs, where: str):
    for index, spec in enumerate(specs if isinstance(specs, list) else []):
        if isinstance(spec, DatasetSpec):  # anything else is a type problem, already named
            yield from _dataset_rules(spec, f"{where}[{index}]")


def _data_rules(d: DataConfig, mode: str):
    yield lambda: _at_least(d.max_length, MIN_MAX_LENGTH, "data.max_length")
    yield lambda: _in_range(d.shuffle_seed, 0, MAX_SEED, "data.shuffle_seed")
    yield lambda: _tools_problems(d.tools)
    for field in ("sft_mixture", "sft_val_mixture", "rl_mixture"):
        yield from _mixture_rules(getattr(d, field), f"data.{field}")
    needed = {"sft": ("sft_mixture", "sft_val_mixture"), "rl": ("rl_mixture",)}
    for stage, fields in needed.items():
        for field in fields:
            yield lambda stage=stage, field=field: [] if stage not in mode.split("+") or getattr(d, field) else [
                f"data.{field}: must list at least one DatasetSpec when output.mode={mode!r}"]


def _optimizer_rules(o: OptimizerConfig, where: str):
    yield lambda: _one_of(o.name, OPTIMIZERS, f"{where}.name")
    yield lambda: _one_of(o.lr_schedule, LR_SCHEDULES, f"{where}.lr_schedule")
    for field in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"):
        yield lambda field=field: _at_least(getattr(o, field), 0.0, f"{where}.{field}")
    yield lambda: [] if max(o.embedding_lr, o.unembedding_lr, o.matrix_lr) > 0 else [
        f"{where}.matrix_lr: every learning rate is 0, so training would change nothing; set one > 0"]
    yield lambda: [] if 0.0 < o.init_lr_frac <= 1.0 else [f"{where}.init_lr_frac: must be in (0, 1], got {o.init_lr_frac!r}"]
    yield lambda: [] if 0.0 <= o.warmup_ratio < 1.0 else [f"{where}.warmup_ratio: must be in [0, 1), got {o.warmup_ratio!r}"]


def _sampling_rules(s: SamplingConfig, where: str, max_length, why_positive: str):
    for field in ("max_new_tokens", "batch_size"):
        yield lambda field=field: _at_least(getattr(s, field), 1, f"{where}.{field}")
    yield lambda: _at_least(s.top_k, 0, f"{where}.top_k")
    yield lambda: [] if s.temperature > 0 else [f"{where}.temperature: must be > 0 ({why_positive}), got {s.temperature!r}"]

    def room():
        if max_length() - s.max_new_tokens >= MIN_PROMPT_ROOM or s.max_new_tokens < 1:
            return []
        return [f"{where}.max_new_tokens: {s.max_new_tokens} leaves {max_length() - s.max_new_tokens} of "
                f"data.max_length={max_length()} tokens for the prompt (needs >= {MIN_PROMPT_ROOM}); lower it or raise "
                "data.max_length"]

    yield room


def _stage_rules(s, where: str):
    """The loop fields SFT and RL share: length, logging and checkpoint cadence."""
    yield lambda: _at_least(s.num_epochs, 1, f"{where}.num_epochs")
    yield lambda: [] if s.num_iterations == -1 or s.num_iterations >= 1 else [
        f"{where}.num_iterations: must be -1 (derive from num_epochs) or >= 1, got {s.num_iterations}"]
    for field in ("log_every", "checkpoint_every", "batch_size", "examples_per_step"):
        yield lambda field=field: _at_least(getattr(s, field), 1, f"{where}.{field}")
    yield from _optimizer_rules(s.optimizer, f"{where}.optimizer")


def _sft_rules(s: SFTConfig, world):
    yield from _stage_rules(s, "sft")
    for field in ("eval_every", "eval_steps"):
        yield lambda field=field: _at_least(getattr(s, field), 1, f"sft.{field}")

    def divisible():
        per_pass = s.batch_size * world()
        if s.batch_size < 1 or world() < 1 or s.examples_per_step % per_pass == 0:
            return []
        return [f"sft.examples_per_step: {s.examples_per_step} is not divisible by batch_size × "
                f"world_size = {s.batch_size} × {world()} = {per_pass}; pick a multiple of {per_pass}"]

    yield divisible


def _rl_rules(r: RLConfig, world, max_length):
    yield from _stage_rules(r, "rl")
    yield from _sampling_rules(r.sampling, "rl.sampling", max_length,
                               "0 makes every sample of a group identical: no learning signal")
    yield lambda: _one_of(r.advantage, ADVANTAGES, "rl.advantage")
    yield lambda: _at_least(r.updates_per_batch, 1, "rl.updates_per_batch")
    yield lambda: _at_least(r.kl_coef, 0.0, "rl.kl_coef")
    yield lambda: [] if 0 < r.clip_eps < 1 else [f"rl.clip_eps: must be in (0, 1), got {r.clip_eps!r}"]
    yield lambda: [] if r.num_samples >= 2 else [
        f"rl.num_samples: the group-mean baseline needs at least 2 samples per prompt, got {r.num_samples}"]

    def split_evenly():
        if r.examples_per_step < 1 or world() < 1:
            return []
        if r.examples_per_step % world() != 0:
            return [f"rl.examples_per_step: {r.examples_per_step} prompts cannot be split evenly over {world()} "
                    f"processes; pick a multiple of {world()}"]
        rows = (r.examples_per_step // world()) * r.num_samples
        if r.batch_size >= 1 and r.num_samples >= 1 and rows % r.batch_size != 0:
            return [f"rl.batch_size: {r.batch_size} does not divide the {rows} sequences per process per "
                    f"step (examples_per_step / world_size × num_samples); pick a divisor of {rows}"]
        return []

    yield split_evenly


def evaluations_on(e: EvalConfig) -> bool:
    """Whether any held-out evaluation runs."""
    return bool(e.at_start or e.after_sft or e.after_rl or e.every_rl_steps > 0)


def _eval_rules(e: EvalConfig, mode: str, max_length):
    yield from _mixture_rules(e.mixture, "evaluation.mixture")
    yield from _sampling_rules(e.sampling, "evaluation.sampling", max_length,
                               "the greedy completion is scored beside the samples; samples need temperature")
    for field in ("num_problems", "num_samples"):
        yield lambda field=field: _at_least(getattr(e, field), 1, f"evaluation.{field}")
    yield lambda: _at_least(e.every_rl_steps, 0, "evaluation.every_rl_steps")
    stages = mode.split("+") if mode in MODES else ["sft", "rl"]  # an unknown mode is output.mode's problem
    yield lambda: [] if not evaluations_on(e) or e.mixture else [
        "evaluation.mixture: must list at least one DatasetSpec while an evaluation is on (at_start, after_sft, "
        "after_rl or every_rl_steps); or turn them all off"]
    yield lambda: [] if not e.after_sft or "sft" in stages else [
        f"evaluation.after_sft: output.mode={mode!r} runs no SFT; set after_sft=False"]
    yield lambda: [] if not e.after_rl or "rl" in stages else [
        f"evaluation.after_rl: output.mode={mode!r} runs no RL; set after_rl=False"]
    yield lambda: [] if e.every_rl_steps == 0 or "rl" in stages else [
        f"evaluation.every_rl_steps: output.mode={mode!r} runs no RL; set every_rl_steps=0"]


def _output_rules(o: OutputConfig):
    yield lambda: _one_of(o.mode, MODES, "output.mode")
    yield lambda: _one_of(o.log_level, LOG_LEVELS, "output.log_level")
    yield lambda: [] if _plain_folder_name(o.experiment_name) else [
        f"output.experiment_name: must be a plain folder name (no '/', '\\\\', NUL, surrounding spaces, '.' or '..'), "
        f"got {o.experiment_name!r}"]
    yield lambda: [] if "\x00" not in str(o.save_dir) else ["output.save_dir: contains a NUL character"]
    yield lambda: [] if not o.use_wandb or o.wandb_project.strip() else [
        "output.wandb_project: must not be empty when use_wandb=True"]
    yield lambda: [] if o.mode != "rl" or o.source_checkpoint is not None else [
        "output.source_checkpoint: mode='rl' needs the model to start from (an HF dir or a run checkpoint)"]
    yield lambda: [] if o.source_checkpoint is None or o.source_checkpoint.strip() else [
        f"output.source_checkpoint: must be None or a model path, got {o.source_checkpoint!r}"]
    yield lambda: [] if o.mode not in ("sft", "sft+rl") or o.source_checkpoint is None else [
        f"output.source_checkpoint: must be None for mode={o.mode!r} "
        "(sft starts from model.name; sft+rl hands SFT's final checkpoint to RL)"]


def _plain_folder_name(name: str) -> bool:
    return (bool(name) and name == name.strip() and name not in (".", "..") and len(name) <= 255
            and not any(c in name for c in "/\\\x00"))


def problems(config: Config) -> list[str]:
    """Every problem of `config`: types (incl. finiteness), ranges and cross-field rules of every section."""
    type_problems = [p.removeprefix("config.") for p in _type_problems(config, Config, "config")]
    if not isinstance(config, Config):
        return type_problems
    wrong = {p.split(":", 1)[0] for p in type_problems}
    type_problems = [p for p in type_problems if not p.endswith(_MISSING_MARK)]
    t, d = config.target, config.data
    world = lambda: t.processes_per_node * t.num_nodes  # noqa: E731
    mode = config.output.mode if isinstance(config.output.mode, str) else ""
    rules = [
        *_target_rules(t),
        *_model_rules(config.model, t),
        *_lora_rules(config),
        *_data_rules(d, mode),
        *_sft_rules(config.sft, world),
        *_rl_rules(config.rl, world, lambda: d.max_length),
        *_eval_rules(config.evaluation, mode, lambda: d.max_length),
        *_output_rules(config.output),
    ]
    range_problems = [p for p in _run_rules(rules) if p.split(":", 1)[0] not in wrong]
    return type_problems + list(dict.fromkeys(range_problems))


def validate(config: Config) -> None:
    """Raise ConfigError listing every problem in `config`; return None when it is valid."""
    found = problems(config)
    if found:
        raise ConfigError(found)


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
