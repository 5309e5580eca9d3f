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
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from integration_training import evaluate
from integration_training.config import Config, RLConfig, to_dict
from integration_training.data.types import Example
from integration_training.errors import TrainingDiverged, UserError
from integration_training.models import load_policy
from integration_training.problems import drop_overlong, rl_steps as total_steps, verified_problems

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


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    normaliser: float,
    kl_coef: float,
    clip_eps: float,
    use_ratio: bool,
    drawn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch; all tensors are flat over its completion tokens.

    `normaliser` is the number of drawn completion tokens of the whole step (all micro-batches, all ranks), so
    summing the micro-batch losses gives the token-level mean. `drawn` (1 = drawn, 0 = forced by a tool; None = all
    drawn) removes forced tokens from the objective, the KL term and the statistics: their log-probs carry no
    gradient. Returns (loss, detached sums for logging).
    """
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
class StepStats:
    reward_sum: float
    num_completions: int
    num_tokens: int
    groups_with_correct: int
    uniform_groups: int
    num_groups: int
    loss: float
    kl: float
    entropy: float
    clip_frac: float
    grad_norm: float


def train_on_rows(
    model,
    ref_model,
    optimizer,
    rows: Sequence[Sequence_],
    rl: RLConfig,
    pad_id: int,
    dist,
    model_config,
    scaler,
) -> dict[str, float]:
    """Forward/backward over micro-batches of `rl.batch_size` rows, `updates_per_batch` optimizer steps.

    Without a reference model, rows whose advantage is 0 (every row of a group with uniform rewards) add exactly
    nothing to the loss: they are left out of the forward/backward and only their tokens count in the
    normaliser, so the gradient is the same as training on every row.
    `model_config`: the compute dtype (forwards under autocast) and gradient checkpointing (which needs the
    full-row scoring layout); `scaler`: the float16 loss scale or None.
    Returns step-level means (over tokens of all ranks): loss, kl, clip_frac and grad_norm over every completion
    token; entropy and logprob_mismatch (mean |trainer − sampler| log-prob) over the tokens trained on;
    skipped_frac, the share of rows left out; diverged (1.0 when a non-finite update was skipped on every rank).
    """
    from integration_training.distributed import all_reduce_max, all_reduce_sum, gradient_sync
    from integration_training.precision import accum_dtype, backward, optimizer_step, unscale

    device = dist.device
    acc = accum_dtype(device)
    trained = [r for r in rows if r.advantage != 0.0] if ref_model is None else list(rows)
    batches = [build_batch(trained[i : i + rl.batch_size], pad_id, device)
               for i in range(0, len(trained), rl.batch_size)]
    real_batches = len(batches)
    # Every rank runs the same number of forward/backward passes, at least one: FSDP2 all-gathers parameters in
    # every forward and DDP reduces gradients in the last backward, collectives all ranks must join. Ranks with
    # fewer rows left pad with a zero-advantage row whose loss is multiplied by 0 (its KL term too).
    most = int(all_reduce_max(torch.tensor([float(max(real_batches, 1))], device=device), dist).item())
    batches += [build_batch([replace(rows[0], advantage=0.0)], pad_id, device)
                for _ in range(most - real_batches)]
    # Token counts are of drawn tokens: tokens a tool forced are context, not actions (no gradient, no statistics).
    local_tokens = sum(r.num_drawn for r in rows)
    trained_tokens_here = sum(float(b.drawn.sum()) for b in batches[:real_batches])
    counts = torch.tensor([float(local_tokens), float(trained_tokens_here), float(len(rows)),
                           float(len(rows) - len(trained))], dtype=acc, device=device)
    all_reduce_sum(counts, dist)
    global_tokens, trained_tokens, global_rows, skipped_rows = (float(c) for c in counts)
    # DDP averages gradients over ranks; multiplying by world size turns that average back into the global sum.
    normaliser = global_tokens / dist.world_size

    def score(module, batch, full_rows: bool, with_entropy: bool = False):
        return completion_logprobs(module, batch, full_rows, model_config.dtype, with_entropy=with_entropy)

    full_rows = model_config.gradient_checkpointing
    ref_logprobs: list[torch.Tensor | None] = [None] * len(batches)
    if ref_model is not None:
        with torch.no_grad():
            ref_logprobs = [score(ref_model, b, False)[0] for b in batches]
    use_ratio = rl.updates_per_batch > 1
    # PPO's denominator is the trainer's own no-grad forward before any update, not the sampler's log-probs: those
    # come from other batch shapes and kernels (and inference mode), which in bf16 differ enough that the ratio
    # would not start at 1 and clipping would fire on the first update.
    old_logprobs = [b.old_logprobs for b in batches]
    if use_ratio:
        with torch.no_grad():
            old_logprobs = [score(model, b, full_rows)[0] for b in batches]
    sums = torch.zeros(6, dtype=acc, device=device)  # loss, kl, entropy, clip, grad_norm, |trainer − sampler|
    diverged = False
    for update in range(rl.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        update_loss = 0.0
        for i, batch in enumerate(batches):
            real = i < real_batches
            with gradient_sync(model, enabled=i == len(batches) - 1):
                logprobs, entropy = score(model, batch, full_rows, with_entropy=update == 0)
                loss, parts = policy_loss(logprobs, old_logprobs[i], ref_logprobs[i], batch.advantages, normaliser,
                                          rl.kl_coef, rl.clip_eps, use_ratio, drawn=batch.drawn)
                loss = loss if real else loss * 0.0
                backward(loss, scaler)
            update_loss += float(loss.detach())
            sums[0] += loss.detach().to(acc) / rl.updates_per_batch
            if update == 0 and real:
                sums[1] += parts["kl_sum"].to(acc)
                sums[2] += (entropy * batch.drawn).sum().to(acc)
                sums[5] += ((logprobs.detach() - batch.old_logprobs).abs() * batch.drawn).sum().to(acc)
            if real:
                sums[3] += parts["clip_count"].to(acc) / rl.updates_per_batch
        unscale(optimizer, scaler)
        grad_norm = _clip_gradients(model, rl.optimizer.grad_clip)
        sums[4] += grad_norm / rl.updates_per_batch
        overflow = scaler is not None and math.isfinite(update_loss) and not math.isfinite(grad_norm)
        # Every rank must agree: a rank that stepped while another did not would leave the replicas apart.
        bad = not math.isfinite(update_loss) or (not math.isfinite(grad_norm) and not overflow)
        if float(all_reduce_sum(torch.tensor([float(bad)], dtype=acc, device=device), dist)[0]) > 0:
            diverged = True
            break
        optimizer_step(optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    all_reduce_sum(sums, dist)
    loss_mean = float(sums[0]) / dist.world_size  # each rank's loss already is a share of the global mean
    return {
        "loss": loss_mean,
        "kl": float(sums[1]) / global_tokens,
        "entropy": float(sums[2]) / trained_tokens if trained_tokens else 0.0,
        "logprob_mismatch": float(sums[5]) / trained_tokens if trained_tokens else 0.0,
        "clip_frac": float(sums[3]) / global_tokens,
        "grad_norm": float(sums[4]) / dist.world_size,
        "skipped_frac": skipped_rows / global_rows,
        "diverged": float(diverged),
    }


def _clip_gradients(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


def rollout_step(model, tokenizer, examples: Sequence[Example], rl: RLConfig, stop_ids: frozenset[int], pad_id: int,
                 generator: torch.Generator, dtype: str, tools=None) -> tuple[list[Sequence_], dict[str, float]]:
    """Sample (under autocast to the compute dtype `dtype`), reward and compute advantages for this rank's prompts.

    `tools`: the engine's `tools.ToolRunner` (None = tools off). Forced tool tokens are counted apart
    ("forced_tokens"); "tokens" and the sampled NLL cover drawn tokens only."""
    from integration_training.template import render_prompt
    from integration_training.evaluate import decode
    from integration_training.rewards import resolve_reward
    from integration_training.precision import autocast
    from integration_training.rollout import sample

    prompt_ids = [render_prompt(tokenizer, list(e.messages[:-1])) for e in examples]
    with autocast(_model_device(model), dtype):
        sampling = rl.sampling
        completions = sample(model, prompt_ids, rl.num_samples, sampling.max_new_tokens, sampling.temperature,
                             sampling.top_k, stop_ids, pad_id, generator, sampling.batch_size, greedy_first=False,
                             tools=tools)
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


def run_rl(config: Config, run_dir: Path, init_model: str | Path, resume: bool, stop=None) -> Path:
    """Run the RL stage from `init_model`; return the final (or, when stopped, the latest) RL checkpoint directory.

    `stop`: the run's StopRequest (cli passes one for the whole run); when a stop makes the loop return before its
    last step it calls `stop.mark_stopped`, so the caller can tell an interruption from completion.
    """
    from integration_training.checkpoint import (
        capture_rng_state,
        latest_checkpoint,
        load_train_state,
        restore_rng_state,
        save_checkpoint,
        step_dir_name,
    )
    from integration_training.template import stop_token_ids
    from integration_training.tools import tool_runner
    from integration_training.distributed import (
        any_rank,
        barrier,
        full_model_state,
        full_optimizer_state,
        init_distributed,
        is_sharded,
        load_full_optimizer_state,
        lockstep,
        wrap_model,
    )
    from integration_training.metrics import MetricsLogger, Progress
    from integration_training.optim import apply_lr, build_optimizer, lr_multiplier
    from integration_training.precision import grad_scaler
    from integration_training.signals import StopRequest

    rl, seed = config.rl, config.data.shuffle_seed
    run_dir = Path(run_dir)
    stage_dir = run_dir / "checkpoints" / STAGE
    dist = init_distributed(config.target)
    latest = latest_checkpoint(stage_dir) if resume else None
    if not resume and latest_checkpoint(stage_dir) is not None:
        raise UserError(f"{stage_dir} already has RL checkpoints; pass --resume to continue, or use a new "
                        "output.experiment_name")
    sharded = is_sharded(config.target, dist)
    if sharded and rl.optimizer.name == "muon":
        raise UserError(
            "rl.optimizer.name: 'muon' orthogonalises whole matrices but target.parallelism='fsdp2' shards them; "
            "use parallelism='ddp' or optimizer='adamw'"
        )
    from integration_training import lora

    # LoRA: the base is always init_model (fresh adapters on it, or the resumed checkpoint's adapter).
    full_resume = latest is not None and config.model.lora is None
    policy, tokenizer = load_policy(latest if full_resume else init_model, config.model, dist.device, training=True)
    adapters = lora.prepare(policy, config.model, latest, seed)
    ref_model = None
    if rl.kl_coef > 0:  # with LoRA the reference is the policy with its adapters off: no second copy
        ref_model = load_reference(init_model, config.model, dist.device) if adapters is None else adapters.reference()
    stop_ids = stop_token_ids(tokenizer)
    runner = tool_runner(tokenizer, config.data.tools)  # None when tools are off: the plain sampler
    pad_id = tokenizer.pad_token_id
    assert pad_id is not None  # load_tokenizer guarantees one

    train_examples = drop_overlong(verified_problems(config.data.rl_mixture, seed, "data.rl_mixture", config.data.tools),
                                   tokenizer, config.data.max_length, rl.sampling, "rl")
    # The problems RL's own evaluations score (evaluation.every_rl_steps), built once for all of them.
    eval_examples = evaluate.held_out_problems(config, tokenizer) if config.evaluation.every_rl_steps > 0 else []
    from integration_training import provenance  # environment.json; a resume refuses changed data (exit 2)

    provenance.record_stage(
        run_dir, STAGE, seed, provenance.data_fingerprints(tokenizer, train_examples, eval_examples, config.data.max_length),
        latest is not None, provenance.local_paths([*config.data.rl_mixture, *config.evaluation.mixture]), dist.is_main,
    )
    steps = total_steps(rl, len(train_examples))
    model = wrap_model(policy, config.target, dist, config.model.dtype)
    optimizer = build_optimizer(policy, rl.optimizer)
    scaler = grad_scaler(dist.device, config.model.dtype)
    start = 0
    if latest is not None:
        state = load_train_state(latest)
        _check_same_layout(latest, state, dist.world_size, config.target.parallelism)
        if sharded:  # saved gathered (keyed by name); rank 0 scatters it into the shards
            load_full_optimizer_state(policy, optimizer, state["optimizer"] if dist.is_main else {})
        else:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("grad_scaler") is not None:
            scaler.load_state_dict(state["grad_scaler"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
        assert start == int(latest.name.removeprefix("step_")), f"{latest}: train_state step {start} != dir name"
        logger.info("RL: resuming from %s (step %d of %d)", latest, start, steps)
    metrics = MetricsLogger(run_dir, STAGE, dist.is_main, config.output.use_wandb, config.output.wandb_project,
                            config.output.experiment_name, to_dict(config))
    metrics.truncate_after(start if latest is not None else -1)
    per_rank = rl.examples_per_step // dist.world_size
    logger.info("RL: %d steps × %d prompts × %d samples (%d prompts per rank), %d train / %d eval prompts",
                steps, rl.examples_per_step, rl.num_samples, per_rank, len(train_examples), len(eval_examples))

    def save(step: int) -> Path:
        weights = None
        if sharded:  # every rank takes part in gathering the shards; rank 0 writes a full HF directory
            weights = full_model_state(policy, prefix="")
            optimizer_state = full_optimizer_state(policy, optimizer)
        else:
            optimizer_state = optimizer.state_dict()
        state = {"step": step, "optimizer": optimizer_state, "rng": capture_rng_state(),
                 "grad_scaler": scaler.state_dict() if scaler is not None else None,
                 "data_position": step * rl.examples_per_step, "total_steps": steps,
                 "world_size": dist.world_size, "parallelism": config.target.parallelism}
        path = stage_dir / step_dir_name(step)
        if dist.is_main:
            if adapters is None:
                path = save_checkpoint(stage_dir, step, policy, tokenizer, state, state_dict=weights,
                                       dtype=config.model.dtype)
            else:  # adapter (float32) + merged export: the writer handles the compute dtype itself
                path = save_checkpoint(stage_dir, step, adapters.writer(final=step == steps, dtype=config.model.dtype),
                                       tokenizer, state, state_dict=weights, dtype="float32")
        barrier(dist)
        return path

    final: Path | None = None
    stop = stop if stop is not None else StopRequest()
    progress = None
    try:
        with stop.handle_signals():
            progress = Progress(total=steps, initial=start, is_main=dist.is_main, description="rl")
            for step in range(start, steps):
                values = _one_step(model, policy, ref_model, optimizer, tokenizer, train_examples, rl, seed, step,
                                   steps, stop_ids, pad_id, dist, apply_lr, lr_multiplier, config.target, config.model,
                                   scaler, runner)
                if values.pop("diverged"):
                    raise TrainingDiverged(STAGE, step + 1, values["loss"], values["grad_norm"], final or latest)
                done = step + 1
                progress.update({"reward": f"{values['reward']:.3f}", "loss": f"{values['loss']:.4f}"})
                if evaluate.due_during_rl(config.evaluation, done, steps):
                    with lora.merged_for_sampling(policy, sharded), lockstep(policy, config.target, dist) as sampler:
                        values |= evaluate.run(config, run_dir, STAGE, done, model=sampler, tokenizer=tokenizer,
                                               dist=dist, problems=eval_examples)
                if done % rl.log_every == 0 or done == steps or "eval/pass@1_strict" in values:
                    metrics.log(done, values)
                    logger.info("RL step %d/%d: %s", done, steps, _brief(values))
                stopping = any_rank(stop.requested, dist)
                if done % rl.checkpoint_every == 0 or done == steps or stopping:
                    final = save(done)
                if stopping and done < steps:
                    stop.mark_stopped(f"RL step {done}/{steps}")
                if stopping:
                    logger.warning("RL: stopped at step %d (%s); resume with --resume", done, stop.reason)
                    return final
            if final is None:  # resumed at the very end: the final checkpoint already exists
                final = latest_checkpoint(stage_dir)
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
    assert final is not None
    return final


def _one_step(model, policy, ref_model, optimizer, tokenizer, examples, rl, seed, step, steps, stop_ids, pad_id, dist,
              apply_lr, lr_multiplier, target, model_config, scaler, runner) -> dict[str, float]:
    from integration_training import lora
    from integration_training.distributed import all_reduce_sum, is_sharded, lockstep, shard
    from integration_training.precision import accum_dtype

    global_indices = step_prompt_indices(step, rl.examples_per_step, len(examples), seed)
    mine = [examples[i] for i in shard(global_indices, dist)]
    generator = torch.Generator(device=dist.device).manual_seed(sampling_seed(seed, step, dist.rank))
    t0 = time.perf_counter()
    # Rows stop at different decode steps on different ranks; under FSDP2 the lockstep proxy pairs the forwards.
    # LoRA: sampling runs with the adapters merged (faster on CPU; the base comes back bit for bit): lora.py.
    with lora.merged_for_sampling(policy, is_sharded(target, dist)), lockstep(policy, target, dist) as sampler:
        rows, stats = rollout_step(sampler, tokenizer, mine, rl, stop_ids, pad_id, generator, model_config.dtype,
                                   tools=runner)
    t1 = time.perf_counter()
    multiplier = lr_multiplier(step, steps, rl.optimizer)
    apply_lr(optimizer, multiplier)
    train = train_on_rows(model, ref_model, optimizer, rows, rl, pad_id, dist, model_config, scaler)
    t2 = time.perf_counter()
    keys = sorted(stats)
    reduced = all_reduce_sum(torch.tensor([stats[k] for k in keys], dtype=accum_dtype(dist.device), device=dist.device),
                             dist)
    s = dict(zip(keys, reduced.tolist(), strict=True))
    gen_seconds, train_seconds = t1 - t0, t2 - t1
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


def _check_same_layout(path: Path, state: dict, world_size: int, parallelism: str) -> None:
    """Resuming needs the world size and parallelism the checkpoint was written with (data shards, RNG per rank)."""
    saved = (state.get("world_size", 1), state.get("parallelism", "none"))
    if saved != (world_size, parallelism):
        raise UserError(
            f"{path}: saved with (world_size, parallelism) = {saved}, this run has {(world_size, parallelism)}; "
            "resume with the same target (processes_per_node × num_nodes and parallelism)"
        )


def _brief(values: dict[str, float]) -> str:
    shown = ("reward", "loss", "kl", "entropy", "response_tokens", "eval/pass@1_strict", "eval/greedy_strict",
             "gen_seconds", "train_seconds")
    return " ".join(f"{k}={values[k]:.4g}" for k in shown if k in values and not math.isnan(values[k]))


def _model_device(model) -> torch.device:
    return next(model.parameters()).device
