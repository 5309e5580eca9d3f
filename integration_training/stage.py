"""The scaffold both training stages run in; `sft.py` and `rl.py` keep only their loop bodies.

Written once here, used by both:
- where a stage keeps its checkpoints and the refusal to overwrite them (`refuse_overwrite`, the CLI's check too);
- resume: a checkpoint's `train_state.pt` holds the step, the run's `Layout` (world size, parallelism, examples per
  step: a resume must match it, since data shards and per-rank RNG follow it) and one entry per *component*; each
  component saves and loads its own state (torchtitan's `Stateful` habit: `state_dict()` / `load_state_dict()`):
  `Optimization` (the optimizer, gathered to rank 0 and scattered back under FSDP2, and the float16 loss scale)
  and `RNGState` (python, numpy, torch, CUDA); a stage adds its own (SFT: its data position);
- the optimizer step (`Optimization.step`): unscale, global grad norm and clipping, then the update, which every
  rank skips together when the loss or grad norm is non-finite (a float16 overflow excepted: GradScaler skips that
  update and lowers its scale); the stage then raises `errors.TrainingDiverged` (exit 1, one line) and its last
  good checkpoint stays the latest;
- the atomic save (`Stage.save`): every rank joins the FSDP2 gathers, rank 0 writes through
  `checkpoint.save_checkpoint` under `checkpoint.step_dir_name` (the only place `step_%06d` is spelled);
- the step boundary (`Stage.step_boundary`): when to checkpoint, and stop requests — the run's `StopRequest` (the
  CLI's, one per run) agreed by every rank, so all ranks stop at the same step (see `signals`);
- metrics.jsonl (truncated to the resumed step) and the progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from integration_training import checkpoint, distributed, metrics, optim, precision
from integration_training.config import Config, to_dict
from integration_training.errors import TrainingDiverged, UserError
from integration_training.signals import StopRequest

logger = logging.getLogger(__name__)

STAGES = ("sft", "rl")


class Stateful(Protocol):
    """A component that saves and loads its own part of a checkpoint's train state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------------- directories


def stage_dir(run_dir: Path, stage: str) -> Path:
    assert stage in STAGES, stage
    return Path(run_dir) / "checkpoints" / stage


def refuse_overwrite(where: Path, stage_dirs: Sequence[Path], resume: bool) -> None:
    """A run that already checkpointed is continued with --resume, never silently overwritten (UserError)."""
    if not resume and any(checkpoint.latest_checkpoint(d) is not None for d in stage_dirs):
        raise UserError(
            f"{where} already holds checkpoints; pass --resume to continue that run, "
            "or change output.experiment_name / remove the directory to start over"
        )


# ---------------------------------------------------------------------------------------------------- components


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a resumed run must share with the run that wrote the checkpoint."""

    world_size: int
    parallelism: str
    examples_per_step: int  # global: SFT sequences or RL prompts per optimizer step
    per_step_field: str  # the config field that sets examples_per_step, named in the refusal

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "parallelism": self.parallelism,
                "examples_per_step": self.examples_per_step}

    def check(self, saved: dict[str, Any], path: Path) -> None:
        if saved != self.state_dict():
            names = ", ".join(saved)
            raise UserError(
                f"{path}: saved with ({names}) = {tuple(saved.values())}, this run has "
                f"{tuple(self.state_dict().values())}; resume with the same target (processes_per_node × num_nodes, "
                f"parallelism) and {self.per_step_field}"
            )


class RNGState:
    """Every RNG training may touch (python, numpy, torch, CUDA)."""

    def state_dict(self) -> dict[str, Any]:
        return checkpoint.capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checkpoint.restore_rng_state(state)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """One optimizer update. `overflow`: float16 gradients overflowed, GradScaler skipped the update and lowered
    the scale (normal). `diverged`: the loss or grad norm was non-finite on some rank; no rank applied the update."""

    grad_norm: float
    overflow: bool
    diverged: bool


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (always reported, before clipping); clip to `max_norm` when > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm


class Optimization:
    """The optimizer and what every update needs: its parameters, clipping, the float16 loss scale, the ranks.

    Stateful: the optimizer state (gathered to rank 0 under FSDP2, keyed by parameter name; by index otherwise)
    and the loss scale. `gather_from`: the module FSDP2 sharded (None when nothing is sharded).
    """

    def __init__(self, optimizer, *, grad_clip: float, dist: distributed.Dist,
                 scaler: torch.amp.GradScaler | None = None, gather_from: nn.Module | None = None) -> None:
        assert grad_clip >= 0.0, grad_clip
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grad_clip = grad_clip
        self.dist = dist
        self.scaler = scaler
        self.gather_from = gather_from

    @classmethod
    def build(cls, model: nn.Module, section, *, name: str, config: Config, dist: distributed.Dist,
              gather_from: nn.Module) -> Optimization:
        """From a stage's config section (`name`: "sft" / "rl"); call after wrapping (FSDP2 swaps parameters)."""
        sharded = distributed.is_sharded(config.target, dist)
        settings = section.optimizer  # an OptimizerConfig
        if sharded and settings.name == "muon":
            raise UserError(
                f"{name}.optimizer.name: 'muon' orthogonalises whole matrices but target.parallelism='fsdp2' shards "
                "them; use parallelism='ddp' or optimizer.name='adamw'"
            )
        return cls(optim.build_optimizer(model, settings), grad_clip=settings.grad_clip, dist=dist,
                   scaler=precision.grad_scaler(dist.device, config.model.dtype),
                   gather_from=gather_from if sharded else None)

    def backward(self, loss: torch.Tensor) -> None:
        precision.backward(loss, self.scaler)

    def set_lr(self, multiplier: float) -> None:
        optim.apply_lr(self.optimizer, multiplier)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: float) -> StepOutcome:
        """Apply the accumulated gradients unless the update would be non-finite on some rank; clear them.

        `loss`: this rank's loss value of the update (what makes it non-finite is checked on every rank).
        """
        precision.unscale(self.optimizer, self.scaler)
        grad_norm = float(clip_gradients(self.params, self.grad_clip))
        overflow = self.scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm)
        bad = not math.isfinite(loss) or (not math.isfinite(grad_norm) and not overflow)
        # Every rank must agree: a rank that stepped while another did not would leave the replicas apart.
        flags = torch.tensor([float(bad)], dtype=precision.accum_dtype(self.dist.device), device=self.dist.device)
        diverged = float(distributed.all_reduce_sum(flags, self.dist)[0]) > 0
        if not diverged:
            precision.optimizer_step(self.optimizer, self.scaler)
            if overflow:
                logger.warning("float16 gradients overflowed: update skipped, loss scale now %g",
                               self.scaler.get_scale())
        self.zero_grad()
        return StepOutcome(grad_norm=grad_norm, overflow=overflow, diverged=diverged)

    def matrix_lr(self) -> float:
        """The LR of the `matrix` group (the bulk of the weights); the others follow the same multiplier."""
        groups = {g.get("name"): g for g in self.optimizer.param_groups}
        return float(groups.get("matrix", self.optimizer.param_groups[0])["lr"])

    def state_dict(self) -> dict[str, Any]:
        if self.gather_from is not None:  # every rank takes part in the gather; rank 0 gets the full state
            state = distributed.full_optimizer_state(self.gather_from, self.optimizer)
        else:
            state = self.optimizer.state_dict()
        return {"optimizer": state, "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.gather_from is not None:  # saved gathered (keyed by name); rank 0 scatters it into the shards
            distributed.load_full_optimizer_state(self.gather_from, self.optimizer,
                                                  state["optimizer"] if self.dist.is_main else {})
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["grad_scaler"] is not None:
            self.scaler.load_state_dict(state["grad_scaler"])


@dataclasses.dataclass(frozen=True)
class Weights:
    """How a stage's model reaches the disk: the HF model (or LoRA's writer) and, under FSDP2, the module the full
    weights are gathered from and the HF model's name inside it."""

    model: nn.Module
    tokenizer: Any
    gather_from: nn.Module | None  # None: not sharded, the model's own state_dict is written
    prefix: str  # e.g. "model." when the HF model sits inside a loss module
    adapters: Any  # lora.Adapters or None
    dtype: str  # the compute dtype


def sampling_settings(sampling) -> Any:
    """The rollout engine's `SamplingSettings` from a config section's `SamplingConfig` (rl.sampling or
    evaluation.sampling): the engine sees token ids and these numbers, never the config."""
    from integration_training.rollout import SamplingSettings

    return SamplingSettings(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_k=sampling.top_k, batch_size=sampling.batch_size)


# ---------------------------------------------------------------------------------------------------- the stage


class Stage:
    """One training stage's run: its checkpoints, resume, saves, stop request and metrics.

    Order: `restore` (before the loop: fixes the checkpoint's contents, resumes), then `with stage.running():`
    around the loop (routes SIGINT/SIGTERM to the run's stop request; closes the metrics file and progress bar
    however the block ends), inside it `open_metrics` / `open_progress`, and `step_boundary` after each step.
    """

    def __init__(self, name: str, config: Config, run_dir: Path, resume: bool, stop: StopRequest | None) -> None:
        self.name = name
        self.config = config
        self.run_dir = Path(run_dir)
        self.dir = stage_dir(self.run_dir, name)
        self.dist = distributed.init_distributed(config.target)
        refuse_overwrite(self.dir, [self.dir], resume)
        self.resume_from = checkpoint.latest_checkpoint(self.dir) if resume else None
        self.last_saved = self.resume_from
        # The CLI passes the run's request (one per run, so it can tell an interrupted stage from a finished one);
        # a library caller without one gets a request of its own.
        self.stop = stop if stop is not None else StopRequest()
        self.sharded = distributed.is_sharded(config.target, self.dist)
        self.layout: Layout | None = None
        self.components: dict[str, Stateful] = {}
        self.metrics: metrics.MetricsLogger | None = None
        self.progress: metrics.Progress | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Stage]:
        try:
            with self.stop.handle_signals():
                yield self
        finally:
            if self.progress is not None:
                self.progress.close()
            if self.metrics is not None:
                self.metrics.close()

    # ---- resume and save

    def restore(self, optimization: Optimization, *, examples_per_step: int, per_step_field: str, total: int) -> int:
        """Fix what this stage's checkpoints hold (the layout; the optimization and RNG components) and, when
        resuming, load every component after checking the layout; the step to continue from (0 when starting).

        `examples_per_step`: global examples per optimizer step (`per_step_field` names its config field). The data
        position is the step: both stages derive what a step reads from its number alone.
        """
        self.layout = Layout(world_size=self.dist.world_size, parallelism=self.config.target.parallelism,
                             examples_per_step=examples_per_step, per_step_field=per_step_field)
        self.components = {"optimization": optimization, "rng": RNGState()}
        if self.resume_from is None:
            return 0
        state = checkpoint.load_train_state(self.resume_from)
        self.layout.check(state["layout"], self.resume_from)
        for key, component in self.components.items():
            component.load_state_dict(state[key])
        step = int(state["step"])
        assert step == checkpoint.checkpoint_step(self.resume_from), f"{self.resume_from}: train_state step {step}"
        logger.info("%s: resuming from %s (step %d of %d)", self.name.upper(), self.resume_from, step, total)
        return step

    def save(self, step: int, *, final: bool, weights: Weights, notes: dict[str, Any]) -> Path:
        """Checkpoint `step` atomically; every rank calls it (FSDP2 gathers), rank 0 writes. `notes`: informative
        entries for a reader of train_state.pt (a resume reads only the step, the layout and the components)."""
        assert self.components, "restore() fixes the components first"
        gathered = None
        if weights.gather_from is not None:
            gathered = distributed.full_model_state(weights.gather_from, prefix=weights.prefix)
        state = {"stage": self.name, "step": step, "layout": self.layout.state_dict(), **notes,
                 **{key: component.state_dict() for key, component in self.components.items()}}
        path = self.dir / checkpoint.step_dir_name(step)
        if self.dist.is_main:
            if weights.adapters is None:
                writer, dtype = weights.model, weights.dtype
            else:  # adapter (float32) + merged export: the writer handles the compute dtype itself
                writer, dtype = weights.adapters.writer(final=final, dtype=weights.dtype), "float32"
            path = checkpoint.save_checkpoint(self.dir, step, writer, weights.tokenizer, state, state_dict=gathered,
                                              dtype=dtype)
            logger.info("saved checkpoint %s", path)
        distributed.barrier(self.dist)
        self.last_saved = path
        return path

    def latest(self) -> Path:
        """What the stage returns: the checkpoint of its last step, or of the step a stop request ended it at."""
        assert self.last_saved is not None, "a stage ends at a saved step"
        return self.last_saved

    def diverged(self, step: int, loss: float, grad_norm: float) -> TrainingDiverged:
        """The error to raise when `step`'s update was skipped as non-finite; names the last good checkpoint."""
        return TrainingDiverged(self.name, step, loss, grad_norm, self.last_saved)

    # ---- stop

    def step_boundary(self, step: int, total: int, *, checkpoint_every: int, save: Callable[[int], Path]) -> bool:
        """After step `step` of `total`: checkpoint (the last step, every `checkpoint_every`, or on a stop request
        agreed by every rank) and say whether the loop must stop here before its end (then `stop.stopped_at` names
        the step, which is how the CLI tells an interrupted stage from a finished one)."""
        stopping = self.stop.agree(self.dist)  # a collective: every rank gets the same answer at the same step
        last = step == total
        if last or stopping or step % checkpoint_every == 0:
            save(step)
        if not stopping or last:
            return False
        self.stop.mark_stopped(f"{self.name.upper()} step {step}/{total}")
        logger.warning("%s: stopped at step %d/%d (%s); continue with --resume", self.name.upper(), step, total,
                       self.stop.reason)
        return True

    # ---- metrics

    def open_metrics(self, step: int) -> metrics.MetricsLogger:
        """metrics.jsonl for this stage, starting at `step`: this stage's rows past a resumed checkpoint's step go
        (a crash after logging a step but before its checkpoint), and all of them when the stage starts afresh."""
        output = self.config.output
        self.metrics = metrics.MetricsLogger(self.run_dir, self.name, self.dist.is_main, output.use_wandb,
                                             output.wandb_project, output.experiment_name, to_dict(self.config))
        self.metrics.truncate_after(step if self.resume_from is not None else -1)
        return self.metrics

    def open_progress(self, total: int, initial: int) -> metrics.Progress:
        self.progress = metrics.Progress(total=total, initial=initial, is_main=self.dist.is_main,
                                         description=self.name)
        return self.progress
