"""The resolved plan, printed at the start of a run and by `--dry-run`.

Resolves as much as it can offline without loading weights: hub sources are listed as downloaded at run time,
local and procedural sources are loaded and counted, and when a tokenizer is at hand (local or cached model) the
SFT data is rendered so that over-long conversations and token counts are real numbers, not guesses.
"""

from __future__ import annotations

import os

import numpy as np

from dataclasses import dataclass
from pathlib import Path

from integration_training.config import Config, DatasetSpec, evaluations_on, run_dir, runs_rl, runs_sft, world_size
from integration_training.errors import UserError

HUB_NOTE = "downloaded at run time"


@dataclass(frozen=True)
class SourceCount:
    label: str
    available: int | None  # None: a hub source, counted only when downloaded
    selected: int  # after max_samples and repeat (an upper bound for hub sources)
    requested: int | None  # max_samples


def _is_hub_source(spec: DatasetSpec) -> bool:
    """True when rows come from the HF hub at run time (no local path, not generated, not custom_json)."""
    from integration_training.data.sources import PROCEDURAL

    return spec.path is None and spec.name not in PROCEDURAL and spec.name != "custom_json"


def count_sources(specs: list[DatasetSpec], seed: int) -> list[SourceCount]:
    from integration_training.data import load_source_counted, source_label

    from integration_training.data.sources import adapter_for

    counts = []
    for spec in specs:
        if _is_hub_source(spec):
            adapter_for(spec.name)  # an unknown or misspelt name fails here, as it would in the run
            upper = spec.max_samples * spec.repeat if spec.max_samples is not None else 0
            counts.append(SourceCount(source_label(spec), None, upper, spec.max_samples))
            continue
        _, counted = load_source_counted(spec, seed)
        counts.append(SourceCount(counted.source, counted.available, counted.after_repeat, spec.max_samples))
    return counts


def _format_counts(name: str, counts: list[SourceCount]) -> list[str]:
    lines = [f"  {name}:"]
    for c in counts:
        available = HUB_NOTE if c.available is None else f"{c.available} rows"
        selected = f"≤ {c.selected}" if c.available is None else str(c.selected)
        lines.append(f"    {c.label:<44} {available:>22} → {selected} selected")
        if c.requested is not None and c.available is not None and c.requested > c.available:
            lines.append(f"      NOTE: max_samples={c.requested} but the source has only {c.available} rows; all are used")
    return lines


@dataclass(frozen=True)
class ModelSize:
    """What the plan knows of a local model from its config alone (built on the meta device)."""

    params: int
    architecture: str
    adapter: int | None  # LoRA: the adapters' parameters; None for a full fine-tune
    merged: int  # LoRA: elements of the adapted base weights, copied once while sampling merges them; else 0
    shape: Shape


def _model_lines(config: Config) -> tuple[list[str], object | None, ModelSize | None]:
    """Model description lines, the tokenizer if it is available offline, and the model's size where it is local."""
    from integration_training import models

    m = config.model
    lines = [f"model: {models.describe_source(m.name)}"]
    local = _local_model_dir(m.name)
    tokenizer, size = None, None
    if local is not None:
        tokenizer = models.load_tokenizer(str(local))
        size = _count_params(local, m.lora)
    params, architecture, adapter = (size.params, size.architecture, size.adapter) if size else (None, None, None)
    params_text = f"{params / 1e6:.1f}M parameters ({architecture})" if params else "parameters: known after download"
    lines.append(
        f"  {params_text}; dtype={m.dtype}; attn={m.attn_implementation}; compile={m.compile}; "
        f"gradient_checkpointing={m.gradient_checkpointing}"
    )
    if m.lora is None:
        lines.append("  training: full fine-tune (model.lora=None): every parameter trains")
    else:
        l = m.lora
        share = f"{adapter / 1e6:.2f}M trainable adapter parameters = {adapter / params:.2%} of the model" if adapter else (
            "trainable adapter parameters: known after download")
        lines.append(
            f"  training: LoRA r={l.r} alpha={l.alpha} (scale {l.alpha / l.r:g}) dropout={l.dropout} on "
            f"{l.target_modules}; base frozen; {share}; adapters train at each stage's matrix_lr "
            "(embedding_lr/unembedding_lr: no trainable tensor); RL after SFT: fresh adapters on the merged SFT model"
        )
    return lines, tokenizer, size


def _local_model_dir(name: str) -> Path | None:
    from integration_training import models

    if models.is_offline_id(name):
        directory = models.offline_model_dir()
    else:
        directory = Path(name).expanduser()
    return directory if (directory / "config.json").is_file() else None


def _count_params(model_dir: Path, lora) -> ModelSize:
    """The model's size from its config alone: the model is built on the meta device, no weights are read. With LoRA
    this also checks the targets against the model (UserError)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from integration_training.lora import adapted_weight_count, adapter_parameter_count

    model_config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    adapter = adapter_parameter_count(model, lora) if lora is not None else None
    merged = adapted_weight_count(model, lora) if lora is not None else 0
    return ModelSize(sum(p.numel() for p in model.parameters()), type(model).__name__, adapter, merged,
                     model_shape(model_config))


def _sft_lines(config: Config, sequences: int, supervised_tokens: int | None, total_tokens: int | None) -> list[str]:
    s, world = config.sft, world_size(config.target)
    accumulation = s.examples_per_step // (s.batch_size * world)
    unit = "packed rows" if s.packing else "conversations"
    if s.num_iterations != -1:
        steps, how = s.num_iterations, "num_iterations"
    else:
        # Epochs are read back to back (an epoch's tail joins the next step): floor(epochs × rows / rows per step).
        steps = s.num_epochs * sequences // s.examples_per_step
        partial = s.num_epochs * sequences % s.examples_per_step
        how = (f"{s.num_epochs} epoch(s) of {sequences} {unit}, epoch tails carried into the next step; the last "
               f"partial step ({partial}/{s.examples_per_step} {unit}) is not trained")
        if supervised_tokens is None:
            steps, how = f"≤ {steps}", f"upper bound: {sequences} conversations before download and packing"
    lines = [
        "SFT:",
        f"  {s.examples_per_step} {unit}/step = micro-batch {s.batch_size} × grad-accum {accumulation} × "
        f"world {world}; {steps} steps ({how})",
        f"  {_optimizer_text(s.optimizer)}; packing={s.packing}",
        f"  val loss every {s.eval_every} steps over {s.eval_steps} batches; checkpoint every "
        f"{s.checkpoint_every} steps and at the end; log every {s.log_every}",
    ]
    if total_tokens:
        per_step = total_tokens / max(sequences, 1) * s.examples_per_step
        lines.append(
            f"  data: {total_tokens} tokens, {supervised_tokens} supervised; ≈ {per_step:.0f} tokens/step"
        )
    return lines


def _optimizer_text(o) -> str:
    return (f"optimizer={o.name} lr(embedding/unembedding/matrix)={o.embedding_lr}/{o.unembedding_lr}/{o.matrix_lr} "
            f"wd={o.weight_decay}; schedule: warmup {o.warmup_ratio:.0%} → {o.lr_schedule} from "
            f"init_lr_frac={o.init_lr_frac}; grad_clip={o.grad_clip}")


def _sampling_text(s) -> str:
    return (f"max_new_tokens={s.max_new_tokens} temperature={s.temperature} top_k={s.top_k}, {s.batch_size} rows per "
            "sampling forward")


def _eval_lines(config: Config, problems: int | None) -> list[str]:
    e = config.evaluation
    if not evaluations_on(e):
        return ["evaluation: off (at_start, after_sft, after_rl all False and every_rl_steps=0)"]
    when = [name for name, on in (("at start", e.at_start), ("after SFT", e.after_sft), ("after RL", e.after_rl)) if on]
    if e.every_rl_steps > 0:
        when.append(f"every {e.every_rl_steps} RL steps")
    return [
        "evaluation:",
        f"  {e.num_problems if problems is None else min(problems, e.num_problems)} problems × {e.num_samples} "
        f"samples + greedy; "
        f"{', '.join(when)}",
        f"  {_sampling_text(e.sampling)}",
    ]


def _rl_lines(config: Config, prompts: int | None) -> list[str]:
    r, world = config.rl, world_size(config.target)
    if r.num_iterations != -1:
        steps, how = r.num_iterations, "num_iterations"
    elif prompts:
        steps, how = r.num_epochs * (prompts // r.examples_per_step), f"{r.num_epochs} epoch(s) of {prompts} prompts"
    else:
        steps, how = "?", "prompt count known after download"
    source = "SFT's final checkpoint" if config.output.mode == "sft+rl" else config.output.source_checkpoint
    return [
        "RL:",
        f"  starts from {source}",
        f"  {r.examples_per_step} prompts × {r.num_samples} samples = {r.examples_per_step * r.num_samples} "
        f"completions/step ({r.examples_per_step // world} prompts per process); {steps} steps ({how})",
        f"  rollouts: {_sampling_text(r.sampling)}; batch_size={r.batch_size} (training)",
        f"  objective: REINFORCE, advantage={r.advantage}, token-level normalisation, kl_coef={r.kl_coef}, "
        f"updates_per_batch={r.updates_per_batch} (clip_eps={r.clip_eps})",
        f"  {_optimizer_text(r.optimizer)}",
        f"  checkpoint every {r.checkpoint_every} steps and at the end; log every {r.log_every}",
    ]


@dataclass(frozen=True)
class Shape:
    """The architecture numbers activation and KV-cache memory depend on (from the model's config.json)."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads × head dim
    vocab: int


def model_shape(model_config) -> Shape:
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    return Shape(model_config.num_hidden_layers, model_config.hidden_size, model_config.intermediate_size,
                 kv_heads * head_dim, model_config.vocab_size)


# Values a decoder layer keeps for backward per token: norms' inputs and outputs, q/k/v, attention output,
# o-proj input, residuals (≈ 10 × hidden) and the MLP's gate, up, activation and product (4 × intermediate).
HIDDEN_VALUES_PER_LAYER, INTERMEDIATE_VALUES_PER_LAYER = 10, 4


def activation_bytes(shape: Shape, tokens: int, scored_tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Activations of one training micro-batch: `tokens` through the layers, `scored_tokens` through the LM head.

    With gradient checkpointing each layer keeps only its input and one layer at a time is recomputed; the
    float32 logits and their gradient (log-softmax) exist for the scored tokens either way.
    """
    per_layer = tokens * (HIDDEN_VALUES_PER_LAYER * shape.hidden + INTERMEDIATE_VALUES_PER_LAYER * shape.intermediate)
    layers = (shape.layers * tokens * shape.hidden + per_layer) if checkpointing else shape.layers * per_layer
    return layers * compute_bytes + 2 * scored_tokens * shape.vocab * 4


def kv_cache_bytes(shape: Shape, rows: int, length: int, compute_bytes: int) -> int:
    """Sampling: the pre-allocated KV cache of one chunk plus one step's float32 logits per row."""
    return 2 * shape.layers * rows * length * shape.kv_dim * compute_bytes + rows * shape.vocab * 4 * 2


def process_baseline_bytes() -> int:
    """This process's resident memory now (Python, torch, transformers loaded): the floor under every estimate."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dynamic_memory_lines(config: Config, params: int, shape: Shape, static: int, supervised_fraction: float,
                          longest_prompt: dict[str, int], merged: int = 0) -> list[str]:
    """Activations (with and without checkpointing) and the sampling KV cache; the peak is the larger stage.

    `longest_prompt`: the longest prompt (tokens) RL / the evaluation samples from, where the data is local; the
    sampler's cache holds that plus max_new_tokens positions (data.max_length bounds it where unknown).
    `merged`: LoRA's adapted base weights (elements); sampling merges the adapters into new float32 tensors while
    the originals wait to come back (`lora.merged_for_sampling`), so it holds one more copy of them — every
    linear layer of the model with the default targets (0.40 GiB for SmolLM2-135M; ~26 GiB for an 8B model).
    FSDP2 shards sample unmerged.
    """
    compute_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[config.model.dtype]
    gib = 1024**3
    checkpointing = config.model.gradient_checkpointing
    stages: dict[str, int] = {}
    lines = []
    if runs_sft(config):
        tokens = config.sft.batch_size * config.data.max_length
        # The LM head runs only at supervised positions (the SFT loss's shortcut): their share of the data's tokens.
        scored = int(tokens * supervised_fraction)
        act = {c: activation_bytes(shape, tokens, scored, compute_bytes, c) for c in (False, True)}
        stages["SFT step"] = act[checkpointing]
        lines.append(f"  SFT activations (micro-batch {config.sft.batch_size} × {config.data.max_length} tokens): "
                     f"{act[False] / gib:.2f} GiB without checkpointing, {act[True] / gib:.2f} GiB with "
                     f"(gradient_checkpointing={checkpointing})")
    if runs_rl(config):
        r = config.rl
        rows = min(r.batch_size, r.examples_per_step // world_size(config.target) * r.num_samples)
        # The longest prompt RL samples from (where the data is local), else the longest drop_overlong keeps.
        prompt = longest_prompt.get("rl", config.data.max_length - r.sampling.max_new_tokens)
        if checkpointing:  # full-row layout: every row carries its prompt
            tokens = rows * config.data.max_length
        else:  # rl.completion_logits: each distinct prompt once, its KV gathered to the completion rows
            tokens = -(-rows // r.num_samples) * prompt + rows * r.sampling.max_new_tokens
        act = {c: activation_bytes(shape, tokens, rows * r.sampling.max_new_tokens, compute_bytes, c)
               for c in (False, True)}
        stages["RL update"] = act[checkpointing]
        lines.append(f"  RL activations ({rows} rows, {tokens} tokens through the layers): {act[False] / gib:.2f} GiB "
                     f"without checkpointing, {act[True] / gib:.2f} GiB with")
    caches = {section: _sampling_chunk(config, section, longest_prompt.get(section))
              for section in ("rl", "evaluation") if _samples(config, section)}
    if caches:
        section, (rows, positions) = max(caches.items(), key=lambda item: item[1][0] * item[1][1])
        kv = kv_cache_bytes(shape, rows, positions, compute_bytes)
        copies = merged * 4 if config.target.parallelism != "fsdp2" else 0
        # Sampling holds the weights but no gradients or optimizer moments of its own beyond the trainer's.
        stages["sampling"] = kv + copies
        merge_text = f" + LoRA's merged weights {copies / gib:.2f} GiB" if copies else ""
        lines.append(f"  sampling KV cache ({rows} rows × {positions} positions, {section}.sampling): "
                     f"{kv / gib:.2f} GiB{merge_text}")
    baseline = process_baseline_bytes() if config.target.device_type == "cpu" else 0
    worst = max(stages, key=stages.get) if stages else None
    peak = static + (stages[worst] if worst else 0) + baseline
    where = "host RSS" if config.target.device_type == "cpu" else "device"
    runtime = f" + runtime {baseline / gib:.2f} (Python, torch, libraries)" if baseline else ""
    lines.append(f"  predicted peak per process ({where}): static {static / gib:.2f} GiB + {worst or 'nothing'} "
                 f"{(stages[worst] if worst else 0) / gib:.2f}{runtime} = {peak / gib:.2f} GiB")
    return lines


def _samples(config: Config, section: str) -> bool:
    return runs_rl(config) if section == "rl" else evaluations_on(config.evaluation)


def _sampling_chunk(config: Config, section: str, longest_prompt: int | None) -> tuple[int, int]:
    """(rows, positions) of the largest sampling chunk of `section`: a sampling call's rows (a step's rollouts, or a
    rank's share of problems × (samples + greedy)) capped by sampling.batch_size; prompt + max_new_tokens positions."""
    world = world_size(config.target)
    if section == "rl":
        sampling, rows = config.rl.sampling, config.rl.examples_per_step // world * config.rl.num_samples
    else:
        e = config.evaluation
        sampling, rows = e.sampling, -(-e.num_problems // world) * (e.num_samples + 1)
    positions = config.data.max_length
    if longest_prompt is not None:
        positions = min(positions, longest_prompt + sampling.max_new_tokens)
    return min(rows, sampling.batch_size), positions


def predicted_peak_bytes(text: str) -> int:
    """The predicted peak from a rendered plan (tests and benchmarks compare it with a measurement)."""
    import re

    match = re.search(r"predicted peak per process \([^)]*\):.* = (\d+\.\d+) GiB", text)
    assert match, "the plan has a predicted-peak line"
    return int(float(match[1]) * 1024**3)


def _memory_lines(config: Config, params: int | None, adapter: int | None, shape: Shape | None = None,
                  supervised_fraction: float = 1.0, longest_prompt: dict[str, int] | None = None,
                  merged: int = 0) -> list[str]:
    """Static memory per process (before activations) under mixed precision with float32 masters.

    Training keeps float32 parameters, float32 gradients and AdamW's two float32 moments (16 bytes/parameter)
    whatever `model.dtype` says; a lower compute dtype adds the autocast copies of the weights in flight (counted
    as one compute-dtype copy) and is what the frozen KL reference is held in. With LoRA (`adapter` = its parameter
    count) the frozen base keeps its float32 weights and casts, but gradients and moments exist only for the float32
    adapters, and the KL reference is the base with the adapters off (no copy).
    """
    if not params:
        return ["memory: estimated once the model's size is known"]
    compute_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[config.model.dtype]
    gib = 1024**3
    kl = config.rl.kl_coef > 0 and runs_rl(config)
    casts = params * compute_bytes if compute_bytes != 4 else 0

    def line(label: str, trainable: int, adapters: int, reference: int, digits: int) -> str:
        masters, gradients, optimizer = params * 4, trainable * 4, trainable * 8  # AdamW: two fp32 moments
        total = (masters + adapters + gradients + optimizer + casts + reference) / gib
        adapter_text = f" + fp32 adapters {adapters / gib:.{digits}f}" if adapters else ""
        return (
            f"{label}: fp32 master weights {masters / gib:.2f} GiB{adapter_text} + fp32 grads "
            f"{gradients / gib:.{digits}f} + optimizer {optimizer / gib:.{digits}f} + {config.model.dtype} weight casts "
            f"{casts / gib:.2f} + reference {reference / gib:.2f} = {total:.2f} GiB"
        )

    full_reference = params * compute_bytes if kl else 0
    if config.model.lora is None:
        lines = [line("memory (per process, before activations)", params, 0, full_reference, 2)]
    elif adapter is None:
        lines = ["memory: estimated once the model's size is known"]
    else:
        lines = [
            line("memory with LoRA (per process, before activations)", adapter, adapter * 4, 0, 3)
            + (" (KL reference: the base with adapters off, no copy)" if kl else ""),
            line("  a full fine-tune would need", params, 0, full_reference, 2),
        ]
    trainable = params if config.model.lora is None else (adapter or 0)
    static = params * 4 + trainable * 12 + casts + (full_reference if config.model.lora is None else 0) + (
        0 if config.model.lora is None else trainable * 4)
    if shape is not None and (config.model.lora is None or adapter is not None):
        lines += _dynamic_memory_lines(config, params, shape, static, supervised_fraction, longest_prompt or {},
                                       merged if config.model.lora is not None else 0)
    if config.model.dtype == "bfloat16" and config.target.device_type == "cpu":
        lines.append("  note: bfloat16 compute on CPU is slow (measured ~20x float32 on 2 cores); float32 is the CPU choice")
    return lines


def render_plan(config: Config, config_path: str, device_note: str | None) -> str:
    """The whole plan as text. Loads tokenizers and local data, never model weights."""
    from integration_training import template
    from integration_training.data import build_mixture

    t = config.target
    lines = [f"== plan for {config_path} ==", f"mode: {config.output.mode}   run dir: {run_dir(config)}"]
    lines.append(
        f"device: {t.device_type} gpu_ranks={t.gpu_ranks}; {t.processes_per_node} process(es)/node × {t.num_nodes} "
        f"node(s) = world size {world_size(t)}; parallelism={t.parallelism}"
    )
    if device_note:
        lines.append(f"  NOTE: {device_note} — a real run here would stop before loading anything")
    model_lines, tokenizer, size = _model_lines(config)
    params, adapter, shape, merged = (size.params, size.adapter, size.shape, size.merged) if size else (None, None, None, 0)
    lines += model_lines
    data = config.data
    lines.append(f"data (shuffle_seed={data.shuffle_seed}, max_length={data.max_length}, tools={data.tools}):")
    for field in ("sft_mixture", "sft_val_mixture", "rl_mixture"):
        specs = getattr(data, field)
        if specs:
            lines += _format_counts(field, count_sources(specs, data.shuffle_seed))
    if config.evaluation.mixture:
        lines += _format_counts("evaluation.mixture", count_sources(config.evaluation.mixture, data.shuffle_seed))
    sft_offline = all(not _is_hub_source(s) for s in data.sft_mixture)
    example_text = None
    supervised_fraction = 1.0  # unknown (hub data): the LM head at every position, an upper bound
    if runs_sft(config):
        sequences, supervised, total = _sft_data_estimate(config, tokenizer, sft_offline, lines)
        supervised_fraction = supervised / total if supervised and total else 1.0
        lines += _sft_lines(config, sequences, supervised, total)
        if tokenizer is not None and sft_offline:
            mixture = build_mixture(data.sft_mixture, data.shuffle_seed, data.tools)
            rendered = template.render_conversation(tokenizer, list(mixture.examples[0].messages), data.tools)
            example_text = template.format_masked_example(tokenizer, rendered)
    sampled = _sampled_prompts(config, tokenizer)
    if runs_rl(config):
        lines += _rl_lines(config, sampled["rl"][0] if "rl" in sampled else None)
    lines += _eval_lines(config, sampled["evaluation"][0] if "evaluation" in sampled else None)
    longest = {section: longest for section, (_, longest) in sampled.items() if longest is not None}
    lines += _memory_lines(config, params, adapter, shape, supervised_fraction, longest, merged)
    if example_text is not None:
        lines += ["one rendered training example (supervised tokens between « and »):", example_text]
    else:
        lines.append("rendered example: shown once the tokenizer and data are available (hub sources/model)")
    return "\n".join(lines)


def _sampled_prompts(config: Config, tokenizer) -> dict[str, tuple[int, int | None]]:
    """{"rl" / "evaluation": (usable prompts, longest prompt in tokens or None)} for the sections that sample from
    local sources, through the checks their stage makes before it starts (verifiers, fit, RL's one step)."""
    from integration_training.problems import held_out_problems, rl_problems, rl_steps, verified_problems
    from integration_training.template import render_prompt

    data, evaluation = config.data, config.evaluation
    mixtures = []  # (section, field, specs, what the stage itself takes from them once a tokenizer is known)
    if runs_rl(config) and all(not _is_hub_source(s) for s in data.rl_mixture):
        mixtures.append(("rl", "data.rl_mixture", data.rl_mixture, rl_problems))
    if evaluations_on(evaluation) and all(not _is_hub_source(s) for s in evaluation.mixture):
        mixtures.append(("evaluation", "evaluation.mixture", evaluation.mixture, held_out_problems))
    found = {}
    for section, what, specs, problems in mixtures:
        if tokenizer is None:  # the verifier check only; the count is an upper bound
            found[section] = (len(verified_problems(specs, data.shuffle_seed, what, data.tools)), None)
            continue
        examples = problems(config, tokenizer)
        found[section] = (len(examples), max(len(render_prompt(tokenizer, list(e.messages[:-1]))) for e in examples))
    if "rl" in found:
        rl_steps(config.rl, found["rl"][0])
    return found


def render_mixture(tokenizer, specs, config: Config, what: str) -> list:
    """The dry run's check of a mixture: render without writing the cache, with the same messages as training."""
    import logging

    from integration_training import template
    from integration_training.data import build_mixture

    mixture = build_mixture(specs, config.data.shuffle_seed, config.data.tools)
    rendered, report = template.render_examples(tokenizer, mixture.examples, config.data.max_length,
                                                config.data.tools)
    for line in report.lines():
        logging.getLogger(__name__).info("%s: %s", what, line)
    if not rendered:
        raise UserError(f"data.{what}: no conversation fits data.max_length={config.data.max_length}; raise it")
    return rendered


def _sft_data_estimate(config: Config, tokenizer, offline: bool, lines: list[str]) -> tuple[int, int | None, int | None]:
    """(sequences per epoch, supervised tokens, total tokens) — exact when data and tokenizer are local."""
    from integration_training import template
    from integration_training.data import build_mixture

    data = config.data
    if not offline:
        upper = sum(s.max_samples * s.repeat for s in data.sft_mixture if s.max_samples is not None)
        return upper, None, None
    mixture = build_mixture(data.sft_mixture, data.shuffle_seed, data.tools)
    if tokenizer is None:
        return len(mixture.examples), None, None
    rendered, report = template.render_examples(tokenizer, list(mixture.examples), data.max_length, data.tools)
    lines += [f"  rendered {line}" for line in report.lines()]
    # The checks SFT makes before its first step, with the same messages.
    if not rendered:
        raise UserError(f"data.sft_mixture: no conversation fits data.max_length={data.max_length}; raise it")
    if all(not _is_hub_source(s) for s in data.sft_val_mixture):
        render_mixture(tokenizer, data.sft_val_mixture, config, "sft_val_mixture")
    supervised = sum(sum(r.loss_mask) for r in rendered)
    total = sum(len(r.input_ids) for r in rendered)
    if config.sft.packing:  # the training stream's rows: best fit decreasing, the same count every epoch
        from integration_training.data.packing import best_fit_decreasing_rows

        row_of_rank, _ = best_fit_decreasing_rows(np.asarray([len(r) for r in rendered]), data.max_length)
        sequences = int(row_of_rank.max()) + 1
    else:
        sequences = len(rendered)
    if sequences < config.sft.examples_per_step:
        raise UserError(
            f"sft.examples_per_step: {config.sft.examples_per_step} sequences per step, but the SFT "
            f"data gives only {sequences} sequences per epoch (packing={config.sft.packing}); add data or lower it"
        )
    lines.append(f"  chat templates that print a date get the fixed date {template.FIXED_DATE_STRING!r} (exact resume)")
    return sequences, supervised, total
