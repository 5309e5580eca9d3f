"""RL stage: nanochat-style on-policy REINFORCE with a group-mean baseline (GRPO-style options).

One step (= one optimizer step unless `updates_per_batch > 1`):
1. take `examples_per_step` prompts (this rank's round-robin shard; a prompt's whole group stays on one rank);
2. sample `num_samples` completions per prompt with the rollout engine (KV cache, per-row stop);
3. reward each completion 0/1 with the example's strict verifier on the decoded text;
4. advantage = reward − group mean (÷ (group std + eps) for "mean_std"); one scalar per completion;
5. loss = −Σ_tokens(logp · adv) / #completion tokens of the whole step (over all micro-batches and ranks),
   plus `kl_coef` × Σ k3(policy ‖ reference) / #tokens when a frozen reference is configured; with
   `updates_per_batch > 1` the policy term is PPO's clipped ratio objective against the sampler's log-probs.
Completions are scored exactly as sampled (prompt ids + completion ids, never re-tokenised), and the LM head is
applied only at positions that predict a completion token (`logits_to_keep` with a boolean mask).

Determinism: the sampling generator is seeded from (shuffle_seed, step, rank), and the prompts of a step are a
pure function of the step number, so a resumed run replays exactly what an uninterrupted run would have done.

What RL shares with SFT (checkpoint directory, resume, the guarded optimizer step, saving, stop requests, metrics)
is `stage.py`; this module keeps the RL maths, rollouts → tensors, and the loop body (`_one_step`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from integration_training import evaluate
from integration_training.config import Config, RLConfig
from integration_training.data.types import Example
from integration_training.models import load_policy
from integration_training.problems import held_out_problems, rl_problems, rl_steps as total_steps
from integration_training.stage import Optimization, Weights, sampling_settings

if TYPE_CHECKING:  # the engine (and transformers) load when sampling starts, not when the CLI imports this module
    from integration_training.rollout import SamplingSettings, SpecialTokens

logger = logging.getLogger(__name__)

STAGE = "rl"
STD_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------- pure maths


def group_advantages(rewards: torch.Tensor, kind: str, eps: float = STD_EPS) -> torch.Tensor:
    """[prompts, samples] rewards → advantages of the same shape.

    "mean": reward − group mean (nanochat). "mean_std": additionally ÷ (group std + eps) (GRPO; unbiased std).
    A group whose samples all got the same reward gets exactly 0 advantage (so it contributes no gradient).
    """
    assert rewards.ndim == 2 and rewards.shape[1] >= 2, f"need [prompts, samples>=2], got {tuple(rewards.shape)}"
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    uniform = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    # Subtracting a float mean can leave ±1ulp residue; uniform groups must be exactly zero.
    centred = centred.masked_fill(uniform, 0.0)
    if kind == "mean":
        return centred
    assert kind == "mean_std", f"unknown advantage kind {kind!r}"
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy ‖ ref) on policy samples: exp(r) − r − 1 with r = ref − policy (≥ 0)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


@dataclass(frozen=True)
class PolicyLossInputs:
    """One micro-batch's tensors for `policy_loss`, flat over its completion tokens."""

    logprobs: torch.Tensor  # the policy's, with gradient
    old_logprobs: torch.Tensor  # the sampler's (REINFORCE) or the trainer's before the first update (PPO)
    advantages: torch.Tensor  # each completion's advantage repeated over its tokens
    ref_logprobs: torch.Tensor | None = None  # the frozen reference's (KL term); None without one
    drawn: torch.Tensor | None = None  # 1 = drawn, 0 = forced by a tool; None = all drawn


def policy_loss(
    inputs: PolicyLossInputs, *, normaliser: float, kl_coef: float, clip_eps: float, use_ratio: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch.

    `normaliser` is the number of drawn completion tokens of the whole step (all micro-batches, all ranks), so
    summing the micro-batch losses gives the token-level mean. `inputs.drawn` removes forced tokens from the
    objective, the KL term and the statistics: their log-probs carry no gradient. Returns (loss, detached sums for
    logging).
    """
    logprobs, old_logprobs, advantages = inputs.logprobs, inputs.old_logprobs, inputs.advantages
    ref_logprobs, drawn = inputs.ref_logprobs, inputs.drawn
    assert logprobs.shape == old_logprobs.shape == advantages.shape and logprobs.ndim == 1
    assert normaliser > 0
    if drawn is not None:
        assert drawn.shape == logprobs.shape
        # where(), not multiplication: a forced token's log-prob must not reach the graph at all (0 · inf = nan).
        keep = drawn > 0
        logprobs = torch.where(keep, logprobs, logprobs.detach().new_zeros(()))
        old_logprobs = torch.where(keep, old_logprobs, 0.0)
        advantages = torch.where(keep, advantages, 0.0)
        if ref_logprobs is not None:
            ref_logprobs = torch.where(keep, ref_logprobs, 0.0)
    if use_ratio:
        # PPO: the ratio against the sampler's policy, clipped so stale batches cannot push too far.
        ratio = torch.exp(logprobs - old_logprobs)
        unclipped = ratio * advantages
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
        objective = torch.minimum(unclipped, clipped)
        clip_count = (clipped < unclipped).float().sum().detach()
    else:
        objective = logprobs * advantages  # REINFORCE: gradient adv·∇logp
        clip_count = logprobs.new_zeros(())
    loss = -objective.sum() / normaliser
    kl_sum = logprobs.new_zeros(())
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        kl_sum = kl.sum().detach()
        if kl_coef > 0:
            loss = loss + kl_coef * kl.sum() / normaliser
    return loss, {"pg_sum": -objective.sum().detach(), "kl_sum": kl_sum, "clip_count": clip_count}


# ---------------------------------------------------------------------------------------------------- rollouts → tensors


@dataclass(frozen=True)
class Sequence_:
    """One sampled completion ready for training."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]  # sampler's untempered log-probs of completion_ids
    advantage: float
    reward: float
    # Per completion token: forced by a tool (context only: no policy gradient, not in the token normaliser, KL,
    # entropy or length statistics). Empty = no token forced (tools off).
    forced: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        assert not self.forced or len(self.forced) == len(self.completion_ids), "one forced flag per token"
        assert not self.forced or not self.forced[0], "a completion's first token is always drawn"

    @property
    def drawn_mask(self) -> list[float]:
        return [0.0 if f else 1.0 for f in self.forced] if self.forced else [1.0] * len(self.completion_ids)

    @property
    def num_drawn(self) -> int:
        return len(self.completion_ids) - sum(self.forced)


@dataclass(frozen=True)
class TrainBatch:
    """A micro-batch in the grouped layout: each distinct prompt once, its samples' completions beside it.

    Scoring runs the distinct prompts once (with gradient) and expands their KV cache to every sample row, so a
    group of `num_samples` completions pays for its shared prompt once instead of `num_samples` times.
    """

    prompt_ids: torch.Tensor  # [P, Tp] distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [P, Tp]
    prompt_positions: torch.Tensor  # [P, Tp] positions counting real tokens only
    row_prompt: torch.Tensor  # [R] which prompt each completion row continues
    completion_inputs: torch.Tensor  # [R, Wc] each completion without its last token, right-padded (Wc may be 0)
    completion_mask: torch.Tensor  # [R, Wc]
    order: torch.Tensor  # [n] puts (first-token logits [R] ++ later-token logits [n − R]) in row-major order
    targets: torch.Tensor  # [n] the completion tokens, flat in row-major order
    old_logprobs: torch.Tensor  # [n]
    advantages: torch.Tensor  # [n] each completion's advantage repeated over its tokens
    drawn: torch.Tensor  # [n] float: 1 for tokens the policy drew, 0 for tokens a tool forced

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())


def build_batch(rows: Sequence[Sequence_], pad_id: int, device: torch.device) -> TrainBatch:
    """Group rows by prompt; lay out completions so that position j of a row predicts completion token j+1."""
    from integration_training.rollout import left_pad

    assert rows and all(r.completion_ids for r in rows), "every row needs at least one completion token"
    prompts = list(dict.fromkeys(tuple(r.prompt_ids) for r in rows))  # distinct, first-seen order
    slot = {p: i for i, p in enumerate(prompts)}
    prompt_ids, prompt_mask, prompt_positions = left_pad([list(p) for p in prompts], pad_id, device)
    width = max(len(r.completion_ids) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets, old, adv, order, drawn = [], [], [], [], []
    later = len(rows)  # later-token logits follow the R first-token logits
    for b, r in enumerate(rows):
        assert len(r.old_logprobs) == len(r.completion_ids)
        c = len(r.completion_ids)
        inputs[b, : c - 1] = torch.tensor(r.completion_ids[:-1], dtype=torch.long)
        mask[b, : c - 1] = 1
        order += [b] + list(range(later, later + c - 1))
        later += c - 1
        targets += r.completion_ids
        old += r.old_logprobs
        adv += [r.advantage] * c
        drawn += r.drawn_mask
    batch = TrainBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_positions=prompt_positions,
        row_prompt=torch.tensor([slot[tuple(r.prompt_ids)] for r in rows], dtype=torch.long, device=device),
        completion_inputs=inputs.to(device),
        completion_mask=mask.to(device),
        order=torch.tensor(order, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        old_logprobs=torch.tensor(old, dtype=torch.float32, device=device),
        advantages=torch.tensor(adv, dtype=torch.float32, device=device),
        drawn=torch.tensor(drawn, dtype=torch.float32, device=device),
    )
    assert batch.order.numel() == batch.num_tokens == len(rows) + int(batch.completion_mask.sum())
    return batch


def completion_logits(model, batch: TrainBatch, full_rows: bool) -> torch.Tensor:
    """Logits [n, V] predicting each completion token (row-major), LM head only where one is predicted.

    `full_rows=False` (shared prompt): pass 1 runs the distinct prompts (with gradient) and keeps their KV cache;
    the cache is gathered to the sample rows — autograd sums each row's gradient back into its prompt's single
    forward. Pass 2 runs the completions on that cache. Exact: the same numbers as scoring every row in full.
    `full_rows=True`: every row is its prompt + completion in one forward. Needed with gradient checkpointing,
    under which HF layers drop `past_key_values` in training (pass 2 would silently score completions without
    their prompt); it costs recomputing a group's shared prompt once per sample.
    """
    if full_rows:
        return _full_row_logits(model, batch)
    first = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                  position_ids=batch.prompt_positions, use_cache=True, logits_to_keep=1)
    cache = first.past_key_values
    cache.batch_select_indices(batch.row_prompt)
    pieces = [first.logits[batch.row_prompt, -1, :]]
    if batch.completion_inputs.shape[1] > 0:
        keep = batch.completion_mask.bool()
        width = batch.completion_inputs.shape[1]
        start = batch.prompt_positions[batch.row_prompt, -1:] + 1
        later = model(
            input_ids=batch.completion_inputs,
            attention_mask=torch.cat([batch.prompt_mask[batch.row_prompt], batch.completion_mask], dim=1),
            position_ids=start + torch.arange(width, device=start.device)[None, :],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        pieces.append(later[keep] if later.ndim == 3 else later)  # some models ignore a boolean logits_to_keep
    logits = torch.cat(pieces, dim=0)
    assert logits.shape[0] == batch.num_tokens, (tuple(logits.shape), batch.num_tokens)
    return logits[batch.order]


def _full_row_logits(model, batch: TrainBatch) -> torch.Tensor:
    """One forward over [prompt (left-padded) | completion (right-padded)] rows; the kept positions are each row's
    last prompt token and its real completion inputs, which in row-major order are exactly the targets' order."""
    prompt_width = batch.prompt_ids.shape[1]
    ids = torch.cat([batch.prompt_ids[batch.row_prompt], batch.completion_inputs], dim=1)
    mask = torch.cat([batch.prompt_mask[batch.row_prompt], batch.completion_mask], dim=1)
    start = batch.prompt_positions[batch.row_prompt, -1:] + 1
    width = batch.completion_inputs.shape[1]
    positions = torch.cat([batch.prompt_positions[batch.row_prompt],
                           start + torch.arange(width, device=start.device)[None, :]], dim=1)
    keep = torch.cat([torch.zeros_like(batch.prompt_mask[batch.row_prompt], dtype=torch.bool),
                      batch.completion_mask.bool()], dim=1)
    keep[:, prompt_width - 1] = True
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=keep).logits
    logits = logits[keep] if logits.ndim == 3 else logits  # some models ignore a boolean logits_to_keep
    assert logits.shape[0] == batch.num_tokens, (tuple(logits.shape), batch.num_tokens)
    return logits


def completion_logprobs(model, batch: TrainBatch, full_rows: bool, dtype: str,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat log-probs of the completion tokens (+ optional detached per-token entropy).

    The forward runs under autocast to the compute dtype `dtype`; log-softmax in float32.
    """
    from integration_training.precision import autocast

    with autocast(batch.prompt_ids.device, dtype):
        logits = completion_logits(model, batch, full_rows)
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logprobs = logp_all.gather(1, batch.targets[:, None]).squeeze(1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logprobs, entropy


def make_rows(prompt_ids: Sequence[list[int]], completions, rewards: torch.Tensor, advantages: torch.Tensor,
              ) -> list[Sequence_]:
    """Flatten [prompt][sample] into training rows (prompt-major, so a group is contiguous)."""
    rows = []
    for p, group in enumerate(completions):
        for s, completion in enumerate(group):
            rows.append(Sequence_(list(prompt_ids[p]), list(completion.token_ids), list(completion.logprobs),
                                  float(advantages[p, s]), float(rewards[p, s]), tuple(completion.forced)))
    return rows


# ---------------------------------------------------------------------------------------------------- schedule / data


def step_prompt_indices(step: int, examples_per_step: int, num_examples: int, seed: int) -> list[int]:
    """Global indices of the prompts used at `step` (0-based): epoch 0 in mixture order, later epochs reshuffled."""
    assert num_examples > 0
    indices = []
    for position in range(step * examples_per_step, (step + 1) * examples_per_step):
        epoch, offset = divmod(position, num_examples)
        order = list(range(num_examples))
        if epoch > 0:
            random.Random(f"rl-epoch/{seed}/{epoch}").shuffle(order)
        indices.append(order[offset])
    return indices


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """A generator seed per (run seed, step, rank): resumable without saving generator state."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**62)


# ---------------------------------------------------------------------------------------------------- model loading


def load_reference(init_model: str | Path, model_config, device: torch.device):
    """The frozen KL reference: the initial model in the compute dtype (it is never trained: no masters)."""
    model, _ = load_policy(init_model, model_config, device, training=False)
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class PolicyModels:
    """The models an RL update runs. `model`: the policy as it trains (wrapped by DDP / FSDP2); `reference`: the
    frozen KL reference (None without one); `dtype`: the compute dtype of every forward (autocast); `full_rows`:
    score whole prompt+completion rows (needed under gradient checkpointing, see `completion_logits`)."""

    model: torch.nn.Module
    reference: torch.nn.Module | None
    dtype: str
    full_rows: bool

    @classmethod
    def of(cls, model, reference, model_config) -> PolicyModels:
        return cls(model=model, reference=reference, dtype=model_config.dtype,
                   full_rows=model_config.gradient_checkpointing)

    def score(self, batch: TrainBatch, with_entropy: bool = False):
        return completion_logprobs(self.model, batch, self.full_rows, self.dtype, with_entropy=with_entropy)

    def score_reference(self, batch: TrainBatch) -> torch.Tensor:
        assert self.reference is not None
        return completion_logprobs(self.reference, batch, False, self.dtype)[0]


@dataclass(frozen=True)
class _MicroBatches:
    """An update's micro-batches: the `real` first ones hold this rank's rows, the rest are zero-weight padding."""

    batches: list[TrainBatch]
    real: int
    global_tokens: float  # drawn completion tokens of the step, all ranks (the normaliser's numerator)
    trained_tokens: float  # drawn tokens of the rows actually run, all ranks
    global_rows: float
    skipped_rows: float


def _micro_batches(rows: Sequence[Sequence_], trained: Sequence[Sequence_], batch_size: int, pad_id: int,
                   dist) -> _MicroBatches:
    from integration_training.distributed import all_reduce_max, all_reduce_sum
    from integration_training.precision import accum_dtype

    device = dist.device
    batches = [build_batch(trained[i : i + batch_size], pad_id, device) for i in range(0, len(trained), batch_size)]
    real = len(batches)
    # Every rank runs the same number of forward/backward passes, at least one: FSDP2 all-gathers parameters in
    # every forward and DDP reduces gradients in the last backward, collectives all ranks must join. Ranks with
    # fewer rows left pad with a zero-advantage row whose loss is multiplied by 0 (its KL term too).
    most = int(all_reduce_max(torch.tensor([float(max(real, 1))], device=device), dist).item())
    batches += [build_batch([replace(rows[0], advantage=0.0)], pad_id, device) for _ in range(most - real)]
    # Token counts are of drawn tokens: tokens a tool forced are context, not actions (no gradient, no statistics).
    counts = torch.tensor([float(sum(r.num_drawn for r in rows)), sum(float(b.drawn.sum()) for b in batches[:real]),
                           float(len(rows)), float(len(rows) - len(trained))], dtype=accum_dtype(device), device=device)
    all_reduce_sum(counts, dist)
    global_tokens, trained_tokens, global_rows, skipped_rows = (float(c) for c in counts)
    return _MicroBatches(batches=batches, real=real, global_tokens=global_tokens, trained_tokens=trained_tokens,
                         global_rows=global_rows, skipped_rows=skipped_rows)


def train_on_rows(
    models: PolicyModels, optimization: Optimization, rows: Sequence[Sequence_], *, rl: RLConfig, pad_id: int,
) -> dict[str, float]:
    """Forward/backward over micro-batches of `rl.batch_size` rows, `updates_per_batch` optimizer steps.

    Without a reference model, rows whose advantage is 0 (every row of a group with uniform rewards) add exactly
    nothing to the loss: they are left out of the forward/backward and only their tokens count in the
    normaliser, so the gradient is the same as training on every row.
    Returns step-level means (over tokens of all ranks): loss, kl, clip_frac and grad_norm over every completion
    token; entropy and logprob_mismatch (mean |trainer − sampler| log-prob) over the tokens trained on;
    skipped_frac, the share of rows left out; diverged (1.0 when a non-finite update was skipped on every rank).
    """
    from integration_training.distributed import all_reduce_sum

    dist = optimization.dist
    trained = [r for r in rows if r.advantage != 0.0] if models.reference is None else list(rows)
    micro = _micro_batches(rows, trained, rl.batch_size, pad_id, dist)
    global_tokens = micro.global_tokens
    # DDP averages gradients over ranks; multiplying by world size turns that average back into the global sum.
    normaliser = global_tokens / dist.world_size
    sums, diverged = _updates(models, optimization, micro, rl, normaliser)
    all_reduce_sum(sums, dist)
    trained_tokens = micro.trained_tokens
    return {
        "loss": float(sums[0]) / dist.world_size,  # each rank's loss already is a share of the global mean
        "kl": float(sums[1]) / global_tokens,
        "entropy": float(sums[2]) / trained_tokens if trained_tokens else 0.0,
        "logprob_mismatch": float(sums[5]) / trained_tokens if trained_tokens else 0.0,
        "clip_frac": float(sums[3]) / global_tokens,
        "grad_norm": float(sums[4]) / dist.world_size,
        "skipped_frac": micro.skipped_rows / micro.global_rows,
        "diverged": float(diverged),
    }


def _updates(models: PolicyModels, optimization: Optimization, micro: _MicroBatches, rl: RLConfig,
             normaliser: float) -> tuple[torch.Tensor, bool]:
    """The `updates_per_batch` optimizer updates; (this rank's sums: loss, kl, entropy, clip, grad_norm,
    |trainer − sampler|), whether an update was non-finite (then it and the later ones are not applied)."""
    from integration_training.distributed import gradient_sync
    from integration_training.precision import accum_dtype

    batches, acc = micro.batches, accum_dtype(optimization.dist.device)
    ref_logprobs: list[torch.Tensor | None] = [None] * len(batches)
    if models.reference is not None:
        with torch.no_grad():
            ref_logprobs = [models.score_reference(b) for b in batches]
    use_ratio = rl.updates_per_batch > 1
    # PPO's denominator is the trainer's own no-grad forward before any update, not the sampler's log-probs: those
    # come from other batch shapes and kernels (and inference mode), which in bf16 differ enough that the ratio
    # would not start at 1 and clipping would fire on the first update.
    old_logprobs = [b.old_logprobs for b in batches]
    if use_ratio:
        with torch.no_grad():
            old_logprobs = [models.score(b)[0] for b in batches]
    sums = torch.zeros(6, dtype=acc, device=optimization.dist.device)
    for update in range(rl.updates_per_batch):
        optimization.zero_grad()
        update_loss = 0.0
        for i, batch in enumerate(batches):
            real = i < micro.real
            with gradient_sync(models.model, enabled=i == len(batches) - 1):
                logprobs, entropy = models.score(batch, with_entropy=update == 0)
                inputs = PolicyLossInputs(logprobs=logprobs, old_logprobs=old_logprobs[i], advantages=batch.advantages,
                                          ref_logprobs=ref_logprobs[i], drawn=batch.drawn)
                loss, parts = policy_loss(inputs, normaliser=normaliser, kl_coef=rl.kl_coef, clip_eps=rl.clip_eps,
                                          use_ratio=use_ratio)
                loss = loss if real else loss * 0.0
                optimization.backward(loss)
            update_loss += float(loss.detach())
            sums[0] += loss.detach().to(acc) / rl.updates_per_batch
            if update == 0 and real:
                sums[1] += parts["kl_sum"].to(acc)
                sums[2] += (entropy * batch.drawn).sum().to(acc)
                sums[5] += ((logprobs.detach() - batch.old_logprobs).abs() * batch.drawn).sum().to(acc)
            if real:
                sums[3] += parts["clip_count"].to(acc) / rl.updates_per_batch
        outcome = optimization.step(update_loss)
        sums[4] += outcome.grad_norm / rl.updates_per_batch
        if outcome.diverged:
            return sums, True
    return sums, False


@dataclass(frozen=True)
class Rollouts:
    """What sampling needs besides the model: the tokenizer (prompts, decoding for the verifiers), its special ids,
    the sampling settings (from `rl.sampling`), the tool runner (None = tools off) and the compute dtype (autocast)."""

    tokenizer: Any
    special: SpecialTokens
    settings: SamplingSettings
    tools: Any  # tools.ToolRunner | None
    dtype: str


def rollout_step(model, examples: Sequence[Example], generator: torch.Generator, *, rollouts: Rollouts,
                 rl: RLConfig) -> tuple[list[Sequence_], dict[str, float]]:
    """Sample `rl.num_samples` completions per prompt, reward them and compute advantages for this rank's prompts.

    Forced tool tokens are counted apart ("forced_tokens"); "tokens" and the sampled NLL cover drawn tokens only."""
    from integration_training.template import render_prompt
    from integration_training.evaluate import decode
    from integration_training.rewards import resolve_reward
    from integration_training.precision import autocast
    from integration_training.rollout import model_device, sample

    tokenizer = rollouts.tokenizer
    prompt_ids = [render_prompt(tokenizer, list(e.messages[:-1])) for e in examples]
    with autocast(model_device(model), rollouts.dtype):
        completions = sample(model, prompt_ids, num_samples=rl.num_samples, settings=rollouts.settings,
                             special=rollouts.special, generator=generator, greedy_first=False, tools=rollouts.tools)
    rewards = torch.tensor([
        [float(resolve_reward(e.reward).strict(decode(tokenizer, c.token_ids), e.reference)) for c in group]
        for e, group in zip(examples, completions, strict=True)
    ])
    advantages = group_advantages(rewards, rl.advantage)
    rows = make_rows(prompt_ids, completions, rewards, advantages)
    # Sampled tokens' −logp averages to the policy entropy when sampling at temperature 1 (cheap, all rows).
    sampled_nll = -sum(lp for r in rows for lp in r.old_logprobs)
    stats = {
        "reward_sum": float(rewards.sum()),
        "completions": float(rewards.numel()),
        "tokens": float(sum(r.num_drawn for r in rows)),
        "forced_tokens": float(sum(len(r.completion_ids) - r.num_drawn for r in rows)),
        "tool_calls": float(sum(sum(1 for k in range(1, len(r.forced)) if r.forced[k] and not r.forced[k - 1])
                                for r in rows)),
        "groups_any_correct": float((rewards > 0.5).any(dim=1).sum()),
        "uniform_groups": float((rewards == rewards[:, :1]).all(dim=1).sum()),
        "groups": float(rewards.shape[0]),
        "sampled_nll": sampled_nll,
        "finished": float(sum(c.finished for g in completions for c in g)),
    }
    return rows, stats


# ---------------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class RLRun:
    """Everything one RL step reads that stays fixed for the run."""

    rl: RLConfig
    seed: int  # data.shuffle_seed: prompts per step and sampling generators derive from it
    total: int  # steps
    examples: list[Example]  # the RL mixture (prompts that fit)
    policy: torch.nn.Module  # the HF model: sampling and saving
    models: PolicyModels  # what the update runs (wrapped policy, reference)
    optimization: Optimization
    rollouts: Rollouts
    target: Any  # config.target: FSDP2's lockstep sampling needs it


def run_rl(config: Config, run_dir: Path, init_model: str | Path, resume: bool, stop=None) -> Path:
    """Run the RL stage from `init_model`; return the final (or, when stopped, the latest) RL checkpoint directory.

    `stop`: the run's StopRequest (cli passes one for the whole run); when a stop makes the loop return before its
    last step it calls `stop.mark_stopped`, so the caller can tell an interruption from completion.
    """
    from integration_training.stage import Stage

    stage = Stage(STAGE, config, run_dir, resume, stop)
    run, weights, eval_examples = _build_run(config, stage, init_model)
    start = stage.restore(run.optimization, examples_per_step=run.rl.examples_per_step,
                          per_step_field="rl.examples_per_step", total=run.total)
    logger.info("RL: %d steps × %d prompts × %d samples (%d prompts per rank), %d train / %d eval prompts", run.total,
                run.rl.examples_per_step, run.rl.num_samples, run.rl.examples_per_step // stage.dist.world_size,
                len(run.examples), len(eval_examples))

    def save(step: int) -> Path:
        return stage.save(step, final=step == run.total, weights=weights, notes={"total_steps": run.total})

    def evaluate_policy(step: int) -> dict[str, float]:
        """The evaluation stage on the policy in memory (every evaluation.every_rl_steps; the CLI evaluates the
        starting model and the final checkpoint by loading them)."""
        from integration_training import lora
        from integration_training.distributed import lockstep

        with lora.merged_for_sampling(run.policy, stage.sharded), \
                lockstep(run.policy, config.target, stage.dist) as sampler:
            return evaluate.run(config, stage.run_dir, STAGE, step, model=sampler, tokenizer=run.rollouts.tokenizer,
                                dist=stage.dist, problems=eval_examples)

    with stage.running():
        metrics = stage.open_metrics(start)
        progress = stage.open_progress(run.total, start)
        for step in range(start, run.total):
            values = _one_step(run, dist=stage.dist, step=step)
            if values.pop("diverged"):
                raise stage.diverged(step + 1, values["loss"], values["grad_norm"])
            done = step + 1
            progress.update({"reward": f"{values['reward']:.3f}", "loss": f"{values['loss']:.4f}"})
            if evaluate.due_during_rl(config.evaluation, done, run.total):
                values |= evaluate_policy(done)
            if done % run.rl.log_every == 0 or done == run.total or "eval/pass@1_strict" in values:
                metrics.log(done, values)
                logger.info("RL step %d/%d: %s", done, run.total, _brief(values))
            if stage.step_boundary(done, run.total, checkpoint_every=run.rl.checkpoint_every, save=save):
                break
    return stage.latest()


def _build_run(config: Config, stage, init_model: str | Path) -> tuple[RLRun, Weights, list[Example]]:
    """Models, data and optimizer of an RL run: (the run, how its weights are saved, the evaluation problems)."""
    from integration_training import lora, provenance
    from integration_training.distributed import wrap_model
    from integration_training.rollout import SpecialTokens
    from integration_training.template import stop_token_ids
    from integration_training.tools import tool_runner

    rl, seed, latest = config.rl, config.data.shuffle_seed, stage.resume_from
    # LoRA: the base is always init_model (fresh adapters on it, or the resumed checkpoint's adapter).
    full_resume = latest is not None and config.model.lora is None
    policy, tokenizer = load_policy(latest if full_resume else init_model, config.model, stage.dist.device, training=True)
    adapters = lora.prepare(policy, config.model, latest, seed)
    reference = None
    if rl.kl_coef > 0:  # with LoRA the reference is the policy with its adapters off: no second copy
        reference = (load_reference(init_model, config.model, stage.dist.device) if adapters is None
                     else adapters.reference())
    assert tokenizer.pad_token_id is not None  # load_tokenizer guarantees one
    train_examples = rl_problems(config, tokenizer)
    evaluation = config.evaluation
    # The problems RL's own evaluations score (evaluation.every_rl_steps), built once for all of them.
    eval_examples = held_out_problems(config, tokenizer) if evaluation.every_rl_steps > 0 else []
    provenance.record_stage(  # environment.json; a resume refuses changed data (exit 2)
        stage.run_dir, STAGE, seed,
        provenance.data_fingerprints(tokenizer, train_examples, eval_examples, config.data.max_length),
        latest is not None, provenance.local_paths([*config.data.rl_mixture, *evaluation.mixture]),
        stage.dist.is_main,
    )
    model = wrap_model(policy, config.target, stage.dist, config.model.dtype)
    optimization = Optimization.build(policy, rl, name=STAGE, config=config, dist=stage.dist, gather_from=policy)
    rollouts = Rollouts(tokenizer=tokenizer,
                        special=SpecialTokens(stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id),
                        settings=sampling_settings(rl.sampling), tools=tool_runner(tokenizer, config.data.tools),
                        dtype=config.model.dtype)
    run = RLRun(rl=rl, seed=seed, total=total_steps(rl, len(train_examples)), examples=train_examples, policy=policy,
                models=PolicyModels.of(model, reference, config.model), optimization=optimization,
                rollouts=rollouts, target=config.target)
    weights = Weights(model=policy, tokenizer=tokenizer, gather_from=policy if stage.sharded else None, prefix="",
                      adapters=adapters, dtype=config.model.dtype)
    return run, weights, eval_examples


def _one_step(run: RLRun, *, dist, step: int) -> dict[str, float]:
    """RL step `step + 1` (0-based `step`): rollouts on this rank's prompts, the update, the step's statistics."""
    from integration_training import lora
    from integration_training.distributed import all_reduce_sum, is_sharded, lockstep, shard
    from integration_training.optim import lr_multiplier
    from integration_training.precision import accum_dtype

    rl = run.rl
    global_indices = step_prompt_indices(step, rl.examples_per_step, len(run.examples), run.seed)
    mine = [run.examples[i] for i in shard(global_indices, dist)]
    generator = torch.Generator(device=dist.device).manual_seed(sampling_seed(run.seed, step, dist.rank))
    t0 = time.perf_counter()
    # Rows stop at different decode steps on different ranks; under FSDP2 the lockstep proxy pairs the forwards.
    # LoRA: sampling runs with the adapters merged (faster on CPU; the base comes back bit for bit): lora.py.
    with lora.merged_for_sampling(run.policy, is_sharded(run.target, dist)), \
            lockstep(run.policy, run.target, dist) as sampler:
        rows, stats = rollout_step(sampler, mine, generator, rollouts=run.rollouts, rl=rl)
    t1 = time.perf_counter()
    multiplier = lr_multiplier(step, run.total, rl.optimizer)
    run.optimization.set_lr(multiplier)
    train = train_on_rows(run.models, run.optimization, rows, rl=rl, pad_id=run.rollouts.special.pad_id)
    t2 = time.perf_counter()
    keys = sorted(stats)
    reduced = all_reduce_sum(torch.tensor([stats[k] for k in keys], dtype=accum_dtype(dist.device), device=dist.device),
                             dist)
    s = dict(zip(keys, reduced.tolist(), strict=True))
    return _step_values(s, train, rl, multiplier=multiplier, gen_seconds=t1 - t0, train_seconds=t2 - t1)


def _step_values(s: dict[str, float], train: dict[str, float], rl: RLConfig, *, multiplier: float,
                 gen_seconds: float, train_seconds: float) -> dict[str, float]:
    """One step's logged values from the rollout sums over ranks `s` and the update's statistics `train`."""
    return {
        "reward": s["reward_sum"] / s["completions"],
        f"train_pass@{rl.num_samples}": s["groups_any_correct"] / s["groups"],
        "uniform_groups": s["uniform_groups"] / s["groups"],
        "response_tokens": s["tokens"] / s["completions"],  # drawn tokens only
        "forced_tokens": s["forced_tokens"] / s["completions"],
        "tool_calls": s["tool_calls"] / s["completions"],
        "finished": s["finished"] / s["completions"],
        "loss": train["loss"],
        "kl": train["kl"],
        "entropy": train["entropy"],
        "sampled_nll": s["sampled_nll"] / s["tokens"],
        "clip_frac": train["clip_frac"],
        "logprob_mismatch": train["logprob_mismatch"],
        "diverged": train["diverged"],
        "grad_norm": train["grad_norm"],
        "lr_multiplier": multiplier,
        "gen_seconds": gen_seconds,
        "train_seconds": train_seconds,
        "tokens_per_s": s["tokens"] / max(gen_seconds + train_seconds, 1e-9),
    }


def _brief(values: dict[str, float]) -> str:
    shown = ("reward", "loss", "kl", "entropy", "response_tokens", "eval/pass@1_strict", "eval/greedy_strict",
             "gen_seconds", "train_seconds")
    return " ".join(f"{k}={values[k]:.4g}" for k in shown if k in values and not math.isnan(values[k]))
