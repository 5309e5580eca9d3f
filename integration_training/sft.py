"""Supervised fine-tuning: the loop, its data stream, loss, evaluation, checkpoints and exact resume.

Vocabulary used below:
- a *sequence* (what `batch_size` and `examples_per_step` count) is one row of a micro-batch: with
  `packing=True` a packed row of up to `max_length` tokens holding several conversations (each attending only to
  itself), with `packing=False` one right-padded conversation;
- a *step* is one optimizer update over `examples_per_step` sequences from all ranks, split into
  `accumulation = examples_per_step / (batch_size × world_size)` micro-batches per rank.

Loss: cross-entropy summed over supervised tokens of every micro-batch of the step, divided by the supervised-token
count of the whole step over all ranks (counted before any backward), so long and short examples weigh per token
and a micro-batch without supervised tokens contributes exactly 0 (no 0/0).

Data order is a pure function of (shuffle_seed, epoch) (`data/stream.py`): every epoch has the same number of rows
(best-fit-decreasing packing of the length multiset, or one conversation per row), assigned and ordered by seeded
permutations; steps read the epochs back to back, so an epoch's tail is carried into the next step and only the
last epoch's partial step is left out (logged with its size). The position saved in a checkpoint is just the step
number, from which (epoch, step within epoch) follows in O(1); so a resumed run sees exactly the data an
uninterrupted one would. Conversations are tokenised once per machine into a memory-mapped cache
(`data/prepared.py`); `environment.json` records what ran and makes `--resume` refuse changed data.

What SFT shares with RL (checkpoint directory, resume, the guarded optimizer step, saving, stop requests, metrics)
is `stage.py`; this module keeps the SFT loss, its data, and the loop body (`_sft_step`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from integration_training import distributed, lora, models, optim, precision, provenance, template
from integration_training.config import Config, SFTConfig
from integration_training.data.prepared import PreparedConversations, prepare
from integration_training.data.stream import SFTStream
from integration_training.errors import UserError
from integration_training.signals import StopRequest
from integration_training.stage import Optimization, Stage, Weights
from integration_training.template import IGNORE_INDEX, Batch, Rendered

logger = logging.getLogger(__name__)

STAGE = "sft"


# ---------------------------------------------------------------------------------------------------- loss


def _plain_lm_head(model: nn.Module) -> bool:
    """True when the config names no logit transform (soft-capping / scale). Necessary, not sufficient: some
    architectures scale logits under other names (Granite `logits_scaling`, MiniCPM, Falcon-H1 multipliers), so
    `lm_head_shortcut_exact` checks the shortcut against the model's own logits once at start-up."""
    config = model.config
    return not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) in (None, 1.0)


def _shortcut_logits(model: nn.Module, batch: Batch, supervised: torch.Tensor) -> torch.Tensor:
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[supervised])


def _full_logits(model: nn.Module, batch: Batch, supervised: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    return out.logits[supervised]


@torch.no_grad()
def lm_head_shortcut_exact(model: nn.Module, batch: Batch, dtype: str) -> bool:
    """Whether lm_head(hidden) at supervised positions equals the model's own logits on `batch` (one check at start).

    Call with `batch` already on the model's device; dropout is switched off for the comparison.
    """
    if not _plain_lm_head(model):
        return False
    supervised = batch.labels != IGNORE_INDEX
    was_training = model.training
    model.eval()
    try:
        with precision.autocast(batch.input_ids.device, dtype):
            mine = _shortcut_logits(model, batch, supervised).float()
            theirs = _full_logits(model, batch, supervised).float()
    finally:
        model.train(was_training)
    # A logit transform changes values by a factor or a cap; rounding noise of the compute dtype is far smaller.
    tolerance = 1e-4 if not precision.is_mixed(dtype) else 2e-2
    return bool(torch.allclose(mine, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max().clamp_min(1.0))))


class SupervisedTokenLoss(nn.Module):
    """forward(batch tensors) → summed next-token CE over supervised positions (float32 scalar).

    With `lm_head_shortcut`, runs the decoder, keeps only hidden states at supervised positions and applies the LM
    head to those: the [tokens × vocab] logits of unsupervised tokens (prompts, padding) are never materialised.
    Without it (a model whose logits are not plain lm_head(hidden)), the model's own logits are used. The forward
    runs under autocast to the compute dtype `dtype` (parameters stay float32 masters; see `precision`).
    This module, not the HF model, is what gets wrapped by DDP/FSDP2 so that gradient sync sees a forward through
    the wrapper.
    """

    def __init__(self, model: nn.Module, dtype: str, lm_head_shortcut: bool) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.lm_head_shortcut = lm_head_shortcut

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        batch = Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids)
        supervised = labels != IGNORE_INDEX
        with precision.autocast(input_ids.device, self.dtype):
            pick = _shortcut_logits if self.lm_head_shortcut else _full_logits
            logits = pick(self.model, batch, supervised)
        return F.cross_entropy(logits.float(), labels[supervised], reduction="sum")


def batch_to(batch: Batch, device: torch.device) -> Batch:
    mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
    return Batch(input_ids=batch.input_ids.to(device), labels=batch.labels.to(device), attention_mask=mask,
                 position_ids=batch.position_ids.to(device))


def batch_loss_sum(module: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    moved = batch_to(batch, device)
    return module(moved.input_ids, moved.labels, moved.attention_mask, moved.position_ids)


# ---------------------------------------------------------------------------------------------------- data


def gradient_accumulation(stage: SFTConfig, world_size: int) -> int:
    per_pass = stage.batch_size * world_size
    assert stage.examples_per_step % per_pass == 0, "config validation guarantees divisibility"
    return stage.examples_per_step // per_pass


def total_steps(stage: SFTConfig, stream: SFTStream) -> int:
    if stage.num_iterations != -1:
        return stage.num_iterations
    return stream.steps_for_epochs(stage.num_epochs)


def collate(sequences: Sequence[list[Rendered]], packing: bool, pad_id: int, attn_implementation: str) -> Batch:
    if packing:
        width = max(sum(len(r) for r in row) for row in sequences)  # trim to the longest row, not max_length
        return template.collate_packed(sequences, width, pad_id, attn_implementation)
    assert all(len(row) == 1 for row in sequences)
    return template.collate_padded([row[0] for row in sequences], pad_id)


def rank_micro_batches(
    sequences: Sequence[list[Rendered]], batch_size: int, dist: distributed.Dist, packing: bool, pad_id: int,
    attn_implementation: str,
) -> list[Batch]:
    """This rank's micro-batches of one step: micro-batch m of rank r holds sequences block (m × world + r)."""
    per_block = batch_size * dist.world_size
    assert len(sequences) % per_block == 0
    return [
        collate(sequences[m * per_block + dist.rank * batch_size : m * per_block + (dist.rank + 1) * batch_size], packing,
                pad_id, attn_implementation)
        for m in range(len(sequences) // per_block)
    ]


def validation_batches(
    rendered: Sequence[Rendered], stage: SFTConfig, max_length: int, dist: distributed.Dist, pad_id: int,
    attn_implementation: str,
) -> list[Batch]:
    """The first `eval_steps × batch_size × world_size` validation sequences (fixed order), this rank's share."""
    rows = template.pack_greedy(list(rendered), max_length) if stage.packing else [[r] for r in rendered]
    rows = distributed.shard(rows[: stage.eval_steps * stage.batch_size * dist.world_size], dist)
    if not rows:
        raise UserError(
            f"data.sft_val_mixture: {len(rendered)} usable conversations, fewer than the {dist.world_size} processes; "
            "add validation rows (max_samples) or use fewer processes"
        )
    return [collate(rows[i : i + stage.batch_size], stage.packing, pad_id, attn_implementation)
            for i in range(0, len(rows), stage.batch_size)]


# ---------------------------------------------------------------------------------------------------- steps


@torch.no_grad()
def validation_loss(module: nn.Module, batches: Sequence[Batch], dist: distributed.Dist) -> float:
    """Mean per-token loss over the validation batches of all ranks."""
    was_training = module.training
    module.eval()
    totals = torch.zeros(2, dtype=precision.accum_dtype(dist.device), device=dist.device)
    for batch in batches:
        totals[0] += batch_loss_sum(module, batch, dist.device).to(totals.dtype)
        totals[1] += batch.num_supervised
    module.train(was_training)
    distributed.all_reduce_sum(totals, dist)
    return float(totals[0] / totals[1].clamp_min(1))


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    supervised_tokens: int
    tokens: int
    overflow: bool  # float16: the scaled gradients overflowed; GradScaler skipped this update and lowered the scale
    diverged: bool  # non-finite loss or gradients that no loss scale explains: no rank applied the update


def train_step(
    module: nn.Module, optimization: Optimization, micro_batches: Sequence[Batch], *, tokens: int,
    lr_multiplier: float,
) -> StepResult:
    """One optimizer update over this rank's micro-batches; the update is skipped when it would be non-finite.

    `tokens`: conversation tokens (no padding) of the whole step over all ranks, for throughput only.
    """
    dist = optimization.dist
    accum = precision.accum_dtype(dist.device)
    counts = torch.tensor([sum(b.num_supervised for b in micro_batches)], dtype=accum, device=dist.device)
    supervised = int(distributed.all_reduce_sum(counts, dist)[0])
    # DDP/FSDP average gradients over ranks; × world_size turns that average back into a sum over the step.
    scale = dist.world_size / max(supervised, 1)
    loss_sum = torch.zeros((), dtype=accum, device=dist.device)
    for index, batch in enumerate(micro_batches):
        with distributed.gradient_sync(module, enabled=index == len(micro_batches) - 1):
            micro_sum = batch_loss_sum(module, batch, dist.device)
            optimization.backward(micro_sum * scale)
        loss_sum += micro_sum.detach().to(accum)
    distributed.all_reduce_sum(loss_sum, dist)
    loss = float(loss_sum) / max(supervised, 1)
    optimization.set_lr(lr_multiplier)
    outcome = optimization.step(loss)
    return StepResult(loss=loss, grad_norm=outcome.grad_norm, supervised_tokens=supervised, tokens=tokens,
                      overflow=outcome.overflow, diverged=outcome.diverged)


# ---------------------------------------------------------------------------------------------------- the run


def _mixture(specs, config: Config):
    from integration_training.data import build_mixture

    return build_mixture(specs, config.data.shuffle_seed, config.data.tools).examples


def _prepare(tokenizer, examples, config: Config, what: str) -> PreparedConversations:
    """The mixture's conversations, tokenised once per machine (cache) and memory-mapped."""
    prepared = prepare(tokenizer, examples, config.data.max_length, models.cache_root(), config.data.tools)
    for line in prepared.report.lines():
        logger.info("%s: %s", what, line)
    if prepared.report.dropped:
        logger.warning(
            "%s: %d conversations are longer than data.max_length=%d and are not used (see counts above)",
            what, prepared.report.dropped, config.data.max_length,
        )
    if not len(prepared):
        raise UserError(f"data.{what}: no conversation fits data.max_length={config.data.max_length}; raise it")
    return prepared


def _prepare_model(config: Config, path: str, dist: distributed.Dist) -> nn.Module:
    model = models.load_model(path, config.model.dtype, config.model.attn_implementation, dist.device, training=True)
    model.config.use_cache = False
    if config.model.gradient_checkpointing:
        models.enable_activation_checkpointing(model)
    model.train()
    return model


@dataclasses.dataclass(frozen=True)
class SFTData:
    """What the loop reads: the training stream, this rank's validation batches, the step count."""

    stream: SFTStream
    val: list[Batch]
    total: int
    pad_id: int


def _load_data(config: Config, tokenizer, run: Stage) -> SFTData:
    """Data first: a changed source must stop a resume before the model loads, and ranks map one prepared copy."""
    stage, dist = config.sft, run.dist
    train_examples, val_examples = _mixture(config.data.sft_mixture, config), _mixture(config.data.sft_val_mixture, config)
    provenance.record_stage(
        run.run_dir, STAGE, config.data.shuffle_seed,
        provenance.data_fingerprints(tokenizer, train_examples, val_examples, config.data.max_length),
        run.resume_from is not None, provenance.local_paths([*config.data.sft_mixture, *config.data.sft_val_mixture]),
        dist.is_main,
    )
    train_data = _prepare(tokenizer, train_examples, config, "sft_mixture")
    val_data = _prepare(tokenizer, val_examples, config, "sft_val_mixture")
    del train_examples, val_examples  # the prepared arrays are all training reads from here on
    stream = SFTStream(rendered=train_data, seed=config.data.shuffle_seed, packing=stage.packing,
                       max_length=config.data.max_length, sequences_per_step=stage.examples_per_step)
    if stream.rows_per_epoch < stream.sequences_per_step:
        raise UserError(
            f"sft.examples_per_step: {stage.examples_per_step} sequences per step, but the SFT data "
            f"gives only {stream.rows_per_epoch} sequences per epoch (packing={stage.packing}); add data or lower it"
        )
    val = validation_batches(val_data, stage, config.data.max_length, dist, tokenizer.pad_token_id,
                             config.model.attn_implementation)
    return SFTData(stream=stream, val=val, total=total_steps(stage, stream), pad_id=tokenizer.pad_token_id)


@dataclasses.dataclass(frozen=True)
class SFTModel:
    """The model as SFT trains it: the HF model, the loss module around it, what the loop calls, its optimizer."""

    model: nn.Module
    loss_module: SupervisedTokenLoss
    train_module: nn.Module  # loss_module wrapped by DDP / FSDP2 / torch.compile
    optimization: Optimization
    weights: Weights


def _build_model(config: Config, run: Stage, tokenizer, data: SFTData, base_path: str) -> SFTModel:
    dist = run.dist
    # LoRA: the base is always model.name; a resumed run reloads its adapter from the checkpoint.
    weights_from = str(run.resume_from) if run.resume_from and config.model.lora is None else base_path
    model = _prepare_model(config, weights_from, dist)
    adapters = lora.prepare(model, config.model, run.resume_from, config.data.shuffle_seed)
    shortcut = lm_head_shortcut_exact(model, batch_to(data.val[0], dist.device), config.model.dtype)
    logger.info("SFT loss: LM head %s", "only at supervised positions (checked equal to the model's own logits)"
                if shortcut else "over every position: this model's logits are not plain lm_head(hidden) (full path)")
    loss_module = SupervisedTokenLoss(model, config.model.dtype, shortcut)
    train_module = distributed.wrap_model(loss_module, config.target, dist, config.model.dtype)
    # After wrapping: FSDP2 replaces the parameters with sharded ones, which the optimizer must hold.
    optimization = Optimization.build(model, config.sft, name=STAGE, config=config, dist=dist, gather_from=loss_module)
    if config.model.compile:
        train_module = torch.compile(train_module, dynamic=True)
    weights = Weights(model=model, tokenizer=tokenizer, gather_from=loss_module if run.sharded else None,
                      prefix="model.", adapters=adapters, dtype=config.model.dtype)
    return SFTModel(model=model, loss_module=loss_module, train_module=train_module, optimization=optimization,
                    weights=weights)


def _log_plan(stage: SFTConfig, data: SFTData, world: int) -> None:
    logger.info(
        "SFT: %d steps, %d sequences/step (batch_size %d × accumulation %d × world %d), packing=%s, %d conversations",
        data.total, stage.examples_per_step, stage.batch_size, gradient_accumulation(stage, world), world,
        stage.packing, len(data.stream.rendered),
    )
    if stage.num_iterations == -1:
        stream = data.stream
        logger.info(
            "SFT data: %d sequences per epoch; epoch tails carry into the next step; after %d epochs %d sequences "
            "(%s of a step) are left untrained", stream.rows_per_epoch, stage.num_epochs,
            stream.partial_rows(stage.num_epochs), f"{stream.partial_rows(stage.num_epochs)}/{stream.sequences_per_step}",
        )


def run_sft(
    config: Config,
    run_dir: Path,
    resume: bool,
    *,
    stop: StopRequest | None = None,
    after_step: Callable[[int], None] | None = None,
) -> Path:
    """Train per `config.sft`; return the final (or, when stopped, the latest) SFT checkpoint directory.

    `stop`: the run's StopRequest (SIGTERM/SIGINT set it while this runs); the loop checkpoints at the next step
    boundary and returns — the caller checks `stop.stopped_at` to tell a stop from completion. `after_step(step)` is
    called after every completed step, before that step's checkpoint (tests use it to stop or crash at a step).
    """
    run = Stage(STAGE, config, run_dir, resume, stop)
    torch.manual_seed(config.data.shuffle_seed)  # anything stochastic in the model (dropout) starts reproducibly
    base_path = models.resolve_model_path(config.model.name)
    tokenizer = models.load_tokenizer(base_path)
    data = _load_data(config, tokenizer, run)
    built = _build_model(config, run, tokenizer, data, base_path)
    step = run.restore(built.optimization, examples_per_step=data.stream.sequences_per_step,
                       per_step_field="sft.examples_per_step", total=data.total)
    _log_plan(config.sft, data, run.dist.world_size)

    def save(at_step: int) -> Path:
        epoch, epoch_step = data.stream.locate(at_step) if at_step < data.total else (None, None)
        return run.save(at_step, final=at_step == data.total, weights=built.weights,
                        notes={"total_steps": data.total, "epoch": epoch, "epoch_step": epoch_step})

    with run.running():
        metric_log = run.open_metrics(step)
        if step == 0:
            val_loss = validation_loss(built.train_module, data.val, run.dist)
            metric_log.log(0, {"val_loss": val_loss})
            logger.info("step 0: val_loss %.4f", val_loss)
        run.open_progress(data.total, step)
        while step < data.total:
            step = _sft_step(config.sft, run, built, data, step)
            if after_step is not None:
                after_step(step)
            if run.step_boundary(step, data.total, checkpoint_every=config.sft.checkpoint_every, save=save):
                break
    return run.latest()


def _sft_step(stage: SFTConfig, run: Stage, built: SFTModel, data: SFTData, step: int) -> int:
    """Step `step + 1`: the update, its metrics and progress; the step number done (raises TrainingDiverged)."""
    started = time.perf_counter()
    multiplier = optim.lr_multiplier(step, data.total, stage.optimizer)
    sequences = data.stream.step_sequences(step)
    micro = rank_micro_batches(sequences, stage.batch_size, run.dist, stage.packing, data.pad_id,
                               run.config.model.attn_implementation)
    assert len(micro) == gradient_accumulation(stage, run.dist.world_size)
    tokens = sum(len(r) for row in sequences for r in row)
    result = train_step(built.train_module, built.optimization, micro, tokens=tokens, lr_multiplier=multiplier)
    if result.diverged:
        raise run.diverged(step + 1, result.loss, result.grad_norm)
    step += 1
    elapsed = time.perf_counter() - started
    last = step == data.total
    values: dict[str, Any] = {}
    if step % stage.log_every == 0 or last:
        epoch, _ = data.stream.locate(step - 1)
        values.update(loss=result.loss, lr=built.optimization.matrix_lr(), lr_multiplier=multiplier,
                      grad_norm=result.grad_norm, supervised_tokens=result.supervised_tokens, tokens=result.tokens,
                      tokens_per_s=result.tokens / max(elapsed, 1e-9), epoch=epoch)
    if step % stage.eval_every == 0 or last:
        values["val_loss"] = validation_loss(built.train_module, data.val, run.dist)
    if values:
        run.metrics.log(step, values)
        logger.info("step %d/%d: %s", step, data.total, " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    run.progress.update({"loss": f"{result.loss:.4f}", "tok/s": f"{result.tokens / max(elapsed, 1e-9):.0f}"})
    return step


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
