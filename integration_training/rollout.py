"""Batched sampling with a KV cache and per-row stop. Knows nothing of rewards.

Shape of one call to `sample`:
  rows = prompts x samples, taken in chunks of `batch_size` rows. For each chunk:
  1. prefill: the chunk's *distinct* prompts are left-padded and run once (only last-position logits are
     computed), then the KV cache is gathered along the batch dimension so every sample row of a prompt
     shares that prompt's prefix without recomputing it;
  2. decode: one token per step for all live rows, sampled on-device; rows that emit a stop id are dropped
     from the batch (cache, mask and positions are compacted) so finished rows cost nothing afterwards;
  3. the only host sync per step is the count of rows still live (the "all done?" check, which also
     drives compaction); tokens and log-probs stay on-device until the chunk ends.

Log-probs are `log_softmax` of the *untempered* logits at the sampled token: that is what the trainer
recomputes with a plain forward pass over prompt + completion, so the two can be compared directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # as sampled, including the stop token when one was emitted
    logprobs: list[float]  # untempered log-prob of each token in token_ids
    finished: bool  # True iff the last token is a stop id (False: max_new_tokens ran out)


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    stop_ids: frozenset[int],
    pad_id: int,
    generator: torch.Generator,
    batch_size: int,
    greedy_first: bool,
) -> list[list[Completion]]:
    """Sample `num_samples` completions per prompt; result indexed `[prompt][sample]`.

    temperature == 0 (or top_k == 1) is greedy; top_k == 0 disables the top-k filter. `greedy_first=True` makes
    sample 0 of every prompt greedy (argmax) while the others sample: evaluation gets its greedy answer and its
    k samples from one shared prefill instead of two. `generator` must live
    on the model's device (sampling happens there). The model is put in eval mode for the call and its
    previous mode restored afterwards.
    """
    assert num_samples >= 1, num_samples
    assert max_new_tokens >= 0, max_new_tokens
    assert temperature >= 0.0, temperature
    assert top_k >= 0, top_k
    assert batch_size >= 1, batch_size
    assert all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    device = _model_device(model)
    assert generator.device.type == device.type, f"generator on {generator.device}, model on {device}"

    rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    results: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    with torch.inference_mode(), _eval_mode(model):
        for chunk in _chunks(rows, batch_size):
            prompt_order = list(dict.fromkeys(p for p, _ in chunk))  # distinct prompts, first-seen order
            slot = {p: i for i, p in enumerate(prompt_order)}
            completions = _sample_chunk(
                model,
                unique_prompts=[list(prompts[p]) for p in prompt_order],
                row_prompt=[slot[p] for p, _ in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                stop_tensor=stop_tensor,
                pad_id=pad_id,
                generator=generator,
                device=device,
                greedy_rows=torch.tensor([greedy_first and s == 0 for _, s in chunk], device=device),
            )
            for (p, s), completion in zip(chunk, completions, strict=True):
                results[p][s] = completion
    assert all(c is not None for row in results for c in row)
    return results  # type: ignore[return-value]


def _sample_chunk(
    model,
    unique_prompts: list[list[int]],
    row_prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    stop_tensor: torch.Tensor,
    pad_id: int,
    generator: torch.Generator,
    device: torch.device,
    greedy_rows: torch.Tensor,
) -> list[Completion]:
    num_rows = len(row_prompt)
    if max_new_tokens == 0:
        return [Completion([], [], False) for _ in range(num_rows)]

    # 1. Prefill each distinct prompt once; only the last position's logits are needed.
    input_ids, attention_mask, position_ids = left_pad(unique_prompts, pad_id, device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    # Replicate each prompt's cache into its sample rows (a gather along batch; handles uneven groups).
    index = torch.tensor(row_prompt, dtype=torch.long, device=device)
    cache.batch_select_indices(index)
    attention_mask = attention_mask[index]
    next_pos = position_ids[index, -1] + 1  # position of the token about to be fed back
    logits = out.logits[index, -1, :]

    # Outputs live on-device; `live` maps the current (compacted) batch rows to chunk rows.
    tokens_out = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_out = torch.zeros((num_rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    live = torch.arange(num_rows, device=device)
    num_live = num_rows

    for step in range(max_new_tokens):
        token, logprob = pick_tokens(logits, temperature, top_k, generator)
        if bool(greedy_rows.any()):  # rare path (evaluation); a no-op for RL sampling
            greedy = greedy_rows[live]
            argmax = logits.argmax(dim=-1)
            token = torch.where(greedy, argmax, token)
            logprob = torch.where(greedy, torch.log_softmax(logits.float(), -1).gather(1, argmax[:, None]).squeeze(1), logprob)
        tokens_out[live, step] = token
        logprobs_out[live, step] = logprob
        lengths[live] = step + 1
        stopped = torch.isin(token, stop_tensor)
        finished[live] = stopped
        if step == max_new_tokens - 1:
            break
        still = ~stopped
        num_still = int(still.sum())  # the one host sync per step
        if num_still == 0:
            break
        if num_still < num_live:
            # Drop finished rows so later steps don't compute them.
            keep = still.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, token, attention_mask, next_pos = live[keep], token[keep], attention_mask[keep], next_pos[keep]
            num_live = num_still
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((num_live, 1))], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :]

    return _to_completions(tokens_out.tolist(), logprobs_out.tolist(), lengths.tolist(), finished.tolist())


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of `logits` [B, V]; return (tokens [B], untempered log-probs [B])."""
    logits = logits.float()  # bf16 logits would make the log-probs too coarse to compare with the trainer
    logprobs = torch.log_softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    if temperature == 0.0 or top_k == 1:
        token = logits.argmax(dim=-1)
    else:
        scaled = logits / temperature
        if 0 < top_k < vocab:
            kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return token, logprobs.gather(1, token[:, None]).squeeze(1)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to a batch: (input_ids, attention_mask, position_ids), positions counting real tokens only."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
    # Padding positions get 0: they are masked out anyway, and a valid index keeps rotary embeddings finite.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token log-probs [B, T]: entry t is log p(input_ids[:, t] | input_ids[:, :t]), 0 where not completion.

    A plain forward pass with untempered logits; `completion_mask[:, 0]` must be 0 (nothing predicts token 0).
    """
    assert not bool(completion_mask[:, 0].any()), "the first token has no prediction"
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(2, input_ids[:, 1:, None]).squeeze(2)
    picked = torch.cat([picked.new_zeros((picked.shape[0], 1)), picked], dim=1)
    return picked * completion_mask.to(picked.dtype)


def _to_completions(
    tokens: list[list[int]], logprobs: list[list[float]], lengths: list[int], finished: list[bool]
) -> list[Completion]:
    return [
        Completion(token_ids=t[:n], logprobs=lp[:n], finished=f)
        for t, lp, n, f in zip(tokens, logprobs, lengths, finished, strict=True)
    ]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    # Sampling must not see dropout; the trainer's mode is restored afterwards.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
