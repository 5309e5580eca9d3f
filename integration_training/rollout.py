"""Batched sampling with a KV cache and per-row stop. Knows nothing of rewards.

Shape of one call to `sample`:
  rows = prompts x samples, taken in chunks of `batch_size` rows. For each chunk:
  1. prefill: the token prefix common to the chunk's distinct prompts (a chat template's system prompt, often
     a third of every prompt) runs once at batch 1; the remainders of the *distinct* prompts are left-padded
     after it and run once (only last-position logits are computed); then the KV cache is gathered along the
     batch dimension so every sample row of a prompt shares that prompt's prefix without recomputing it;
  2. decode: one token per step for all live rows, sampled on-device; rows that emit a stop id stop recording
     and, once a quarter of the batch has finished, are dropped from it (cache, mask and positions compacted)
     so finished rows cost little afterwards;
  3. the only host sync per step is the count of rows still live (the "all done?" check, which also
     drives compaction); tokens and log-probs stay on-device until the chunk ends.

The KV cache is pre-allocated for the chunk's longest possible sequence (`PreallocatedLayer`): HF's default
cache concatenates every step, which copies the whole cache per token and measured ~35% of decode time at
batch 256 on CPU.

Log-probs are `log_softmax` of the *untempered* logits at the sampled token: that is what the trainer
recomputes with a plain forward pass over prompt + completion, so the two can be compared directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from integration_training.precision import accum_dtype

if TYPE_CHECKING:
    from integration_training.tools import ToolRunner


COMPACT_FRACTION = 4  # compact the decode batch once 1/COMPACT_FRACTION of its rows have finished


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # as sampled, including the stop token when one was emitted
    logprobs: list[float]  # untempered log-prob of each drawn token in token_ids; 0.0 at forced positions
    finished: bool  # True iff the last token is a stop id (False: max_new_tokens ran out)
    forced: list[bool]  # per token: forced by a tool (context, not drawn: no log-prob, no gradient)


@dataclass(frozen=True)
class SamplingSettings:
    """How to draw: built by the caller from its config section (the engine sees token ids and these numbers)."""

    max_new_tokens: int  # ≥ 0
    temperature: float  # 0 = greedy
    top_k: int  # 0 = no top-k filter
    batch_size: int  # rows per sampling forward

    def __post_init__(self) -> None:
        assert self.max_new_tokens >= 0, self.max_new_tokens
        assert self.temperature >= 0.0, self.temperature
        assert self.top_k >= 0, self.top_k
        assert self.batch_size >= 1, self.batch_size


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's ids the engine needs: generation stops at any of `stop_ids`; `pad_id` fills rows."""

    stop_ids: frozenset[int]
    pad_id: int


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    settings: SamplingSettings,
    special: SpecialTokens,
    generator: torch.Generator,
    greedy_first: bool,
    tools: "ToolRunner | None" = None,
    progress: Callable[[float], None] | None = None,
) -> list[list[Completion]]:
    """Sample `num_samples` completions per prompt; result indexed `[prompt][sample]`.

    `settings.temperature == 0` (or top_k == 1) is greedy; top_k == 0 disables the top-k filter. `greedy_first=True` makes
    sample 0 of every prompt greedy (argmax) while the others sample: evaluation gets its greedy answer and its
    k samples from one shared prefill instead of two. `generator` must live
    on the model's device (sampling happens there). The model is put in eval mode for the call and its
    previous mode restored afterwards.

    `tools` (a `tools.ToolRunner`, or None = tools off, exactly the plain sampler): when a row's text ends with an
    open call `<<EXPR=`, the row's next tokens are the forced `RESULT>>` tokens, taken one per step from a per-row
    queue instead of drawing (the draw still runs for the whole batch, so the random stream stays aligned).
    `progress`, when given, is called with the number of rows newly done (a
    fraction of a chunk per decode step, the rest when the chunk ends; the calls sum to len(prompts) * num_samples):
    a progress bar's ETA then moves during a chunk, not once per chunk.
    """
    assert num_samples >= 1, num_samples
    assert all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    device = model_device(model)
    assert generator.device.type == device.type, f"generator on {generator.device}, model on {device}"

    rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    results: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    context = _ChunkContext(settings=settings, stop_tensor=torch.tensor(sorted(special.stop_ids), dtype=torch.long,
                                                                        device=device),
                            pad_id=special.pad_id, generator=generator, device=device, tools=tools, progress=progress)
    with torch.inference_mode(), _eval_mode(model):
        for chunk in _chunks(rows, settings.batch_size):
            prompt_order = list(dict.fromkeys(p for p, _ in chunk))  # distinct prompts, first-seen order
            slot = {p: i for i, p in enumerate(prompt_order)}
            completions = _sample_chunk(
                model,
                context,
                unique_prompts=[list(prompts[p]) for p in prompt_order],
                row_prompt=[slot[p] for p, _ in chunk],
                greedy_rows=torch.tensor([greedy_first and s == 0 for _, s in chunk], device=device),
            )
            for (p, s), completion in zip(chunk, completions, strict=True):
                results[p][s] = completion
    assert all(c is not None for row in results for c in row)
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class _ChunkContext:
    """What every chunk of one `sample` call shares."""

    settings: SamplingSettings
    stop_tensor: torch.Tensor
    pad_id: int
    generator: torch.Generator
    device: torch.device
    tools: "ToolRunner | None"
    progress: Callable[[float], None] | None


def _sample_chunk(
    model, context: _ChunkContext, *, unique_prompts: list[list[int]], row_prompt: list[int], greedy_rows: torch.Tensor,
) -> list[Completion]:
    """Prefill and decode one chunk of rows. One function (~85 lines) on purpose: the decode loop's state (cache,
    masks, positions, the live/active maps and the output buffers) changes together at every step and at every
    compaction; split up, each piece would take and return most of it."""
    max_new_tokens, temperature, top_k = (context.settings.max_new_tokens, context.settings.temperature,
                                          context.settings.top_k)
    pad_id, generator, device = context.pad_id, context.generator, context.device
    stop_tensor, tools, progress = context.stop_tensor, context.tools, context.progress
    num_rows = len(row_prompt)
    reported = 0.0
    if max_new_tokens == 0:
        if progress is not None:
            progress(num_rows)
        return [Completion([], [], False, []) for _ in range(num_rows)]

    # 1. Prefill each distinct prompt once; only the last position's logits are needed.
    logits, cache, attention_mask, next_pos = prefill(model, unique_prompts, pad_id, device, max_new_tokens)
    # Replicate each prompt's cache into its sample rows (a gather along batch; handles uneven groups).
    index = torch.tensor(row_prompt, dtype=torch.long, device=device)
    cache.batch_select_indices(index)
    attention_mask = attention_mask[index]
    next_pos = next_pos[index]  # position of the token about to be fed back
    logits = logits[index]

    # Outputs live on-device; `live` maps the current (compacted) batch rows to chunk rows, `active` marks the batch
    # rows still generating (finished rows stay in the batch until the next compaction, their outputs untouched).
    tokens_out = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_out = torch.zeros((num_rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    live = torch.arange(num_rows, device=device)
    active = torch.ones(num_rows, dtype=torch.bool, device=device)
    num_live = num_rows

    any_greedy = bool(greedy_rows.any())  # evaluation's greedy rows; RL sampling has none
    forcing = _Forcing(tools, num_rows, max_new_tokens, logits.shape[-1], device) if tools else None
    for step in range(max_new_tokens):
        token, logprob = pick_tokens(logits, temperature, top_k, generator, greedy_rows[live] if any_greedy else None)
        if forcing is not None:
            token, logprob = forcing.apply(token, logprob, live, active, step)
        tokens_out[live, step] = torch.where(active, token, pad_id)
        logprobs_out[live, step] = torch.where(active, logprob, 0.0)
        lengths[live] = torch.where(active, step + 1, lengths[live])
        stopped = torch.isin(token, stop_tensor) & active
        finished[live] |= stopped
        if step == max_new_tokens - 1:
            break
        active = active & ~stopped
        if forcing is not None:
            forcing.advance(token, live, active, tokens_out, step)
        num_active = int(active.sum())  # the one host sync per step (tools add theirs in `advance`)
        if num_active == 0:
            break
        if (num_live - num_active) * COMPACT_FRACTION >= num_live:
            # Drop finished rows so later steps don't compute them. Compaction copies the whole KV cache, so it
            # waits until a quarter of the batch is dead: compacting whenever any row stopped cost more than it
            # saved at batch 500, where rows stop a few at a time over the last steps.
            keep = active.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, token, attention_mask, next_pos = live[keep], token[keep], attention_mask[keep], next_pos[keep]
            active = active[keep]
            num_live = num_active
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
        if progress is not None:  # the worst case (every row runs max_new_tokens) paces the bar
            progress(num_rows / max_new_tokens)
            reported += num_rows / max_new_tokens
    if progress is not None:
        progress(num_rows - reported)
    forced = forcing.forced_out.tolist() if forcing is not None else [[False] * max_new_tokens] * num_rows
    return _to_completions(tokens_out.tolist(), logprobs_out.tolist(), lengths.tolist(), finished.tolist(), forced)


class _Forcing:
    """Per-row queues of forced tool tokens for one chunk (indexed by chunk row, so compaction needs nothing).

    `next_token[r]` is the token row r must take at the next step (-1: draw). Host-side `queues` hold the rest of
    each row's forced span. Detection is cheap: only rows whose last drawn token ends in '=' are decoded.
    """

    def __init__(self, tools, num_rows: int, max_new_tokens: int, vocab: int, device: torch.device) -> None:
        self.tools = tools
        self.ends_with_equals = tools.ends_with_equals(vocab, device)
        self.next_token = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        self.forced_out = torch.zeros((num_rows, max_new_tokens), dtype=torch.bool, device=device)
        self.queues: dict[int, list[int]] = {}  # forcing chunk row → its forced tokens after next_token[row]
        self.is_forced: torch.Tensor | None = None

    def apply(self, token, logprob, live, active, step):
        planned = self.next_token[live]
        self.is_forced = (planned >= 0) & active
        self.forced_out[live, step] = self.is_forced
        return torch.where(self.is_forced, planned, token), torch.where(self.is_forced, 0.0, logprob)

    def advance(self, token, live, active, tokens_out, step) -> None:
        """After step `step`: move every queue on by one token, then open queues for rows that just wrote `<<E=`."""
        assert self.is_forced is not None
        # Every row with a queue took its forced token this step (a row that a forced stop id ended keeps popping
        # its queue harmlessly: `apply` forces only active rows).
        for row in list(self.queues):
            rest = self.queues[row]
            if rest:
                self.next_token[row] = rest.pop(0)
            else:  # the span is done: draw again
                self.next_token[row] = -1
                del self.queues[row]
        opened = self.ends_with_equals[token] & active & ~self.is_forced
        for row in live[opened].tolist():
            ids = self.tools.forced_for(tokens_out[row, : step + 1].tolist())
            if ids is None:
                continue
            # A forced token that is a stop id (a tokenizer whose stop token is plain text the result can contain)
            # ends the row like a drawn one: the stop check runs on whatever token the row took.
            self.next_token[row] = ids[0]
            self.queues[row] = ids[1:]  # kept while the row is forcing, even empty: `advance` resets next_token





def prefill(
    model, prompts: list[list[int]], pad_id: int, device: torch.device, room: int
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
    """Run `prompts` once: (last-position logits [U, V], cache with `room` free slots, attention mask, next positions).

    Layout per row: [shared prefix][left padding][rest of the prompt]. The shared prefix is computed once at batch
    1 and copied to every row; padding in the middle is masked out and position ids skip it, so each row sees
    exactly its own prompt at positions 0..len-1 (rotary embeddings are relative, masks are per key).
    """
    shared = shared_prefix_length(prompts)
    rests = [p[shared:] for p in prompts]
    width = max(len(r) for r in rests)
    cache = preallocated_cache(model, shared + width + room)
    mask = torch.ones((len(prompts), shared), dtype=torch.long, device=device)
    if shared > 0:
        ids = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
        model(input_ids=ids, position_ids=torch.arange(shared, device=device)[None], past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=device))
    rest_ids, rest_mask, rest_pos = left_pad(rests, pad_id, device)
    mask = torch.cat([mask, rest_mask], dim=1)
    out = model(input_ids=rest_ids, attention_mask=mask, position_ids=rest_pos + shared, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], out.past_key_values, mask, rest_pos[:, -1] + shared + 1


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own (its last logits)."""
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes into buffers sized once, returning views, instead of concatenating per step.

    The buffers are always normal tensors (made with inference mode off): sampling runs under inference mode,
    but FSDP2's lockstep proxy runs the forward itself under no_grad, and an inference-mode tensor could not be
    written in place there. Normal tensors can be written in place under either.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        with torch.inference_mode(False):
            self._key_buffer = self._empty_like_with_capacity(key_states)
            self._value_buffer = self._empty_like_with_capacity(value_states)
        self.is_initialized = True

    def _empty_like_with_capacity(self, states: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        return states.new_empty((batch, heads, self.capacity, dim))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        assert self.length + new <= self.capacity, f"cache full: {self.length} + {new} > {self.capacity}"
        self._key_buffer[:, :, self.length : self.length + new] = key_states
        self._value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions, keeping the ones held (one copy, instead of recomputing them)."""
        assert capacity >= self.capacity, f"a cache only grows: {self.capacity} -> {capacity}"
        self.capacity = capacity
        if self.is_initialized:
            with torch.inference_mode(False):
                old_key, old_value = self._key_buffer, self._value_buffer
                self._key_buffer = self._empty_like_with_capacity(old_key)
                self._value_buffer = self._empty_like_with_capacity(old_value)
                self._key_buffer[:, :, : self.length] = old_key[:, :, : self.length]
                self._value_buffer[:, :, : self.length] = old_value[:, :, : self.length]
            self._refresh_views()

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the buffers stay; later updates overwrite them)."""
        assert 0 <= length <= self.length, f"cannot truncate a {self.length}-token cache to {length}"
        self.length = length
        if self.is_initialized:
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            with torch.inference_mode(False):
                self._key_buffer = self._key_buffer[indices]
                self._value_buffer = self._value_buffer[indices]
            self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]


def preallocated_cache(model, capacity: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers are `PreallocatedLayer`s (other layer kinds stay as HF made them)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class StreamCache:
    """The KV cache of one conversation, kept between `stream` calls; `fed` lists the tokens whose keys and values
    it holds, in order. A new call reuses the longest common prefix of `fed` and its prompt and computes only the
    rest: exact, since a position's keys and values depend only on the tokens up to it.

    Mutable by design (one conversation's sampling state); one caller at a time.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.fed: list[int] = []
        self.capacity = 0


@torch.inference_mode()  # torch wraps a generator function: the mode holds inside each step, not in the caller
def stream(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    stop_ids: frozenset[int],
    generator: torch.Generator,
    kv: StreamCache,
) -> Iterator[int]:
    """Yield the token ids of one completion of `prompt` (batch 1) as they are drawn; the last one is a stop id
    unless `max_new_tokens` ran out. Same sampling as `sample` (`pick_tokens`), for chat.

    Closing the generator early (a user's stop) is safe: `kv.fed` always describes a valid prefix of the cache
    (it is updated after each forward), so even an interrupt inside a forward leaves `kv` usable.
    The model must already be in eval mode (chat loads it so; toggling modes per token would cost a module walk).
    """
    assert len(prompt) > 0, "a prompt needs at least one token"
    assert max_new_tokens >= 1, max_new_tokens
    assert not model.training, "stream() samples; put the model in eval mode first"
    device = model_device(model)
    assert generator.device.type == device.type, f"generator on {generator.device}, model on {device}"
    prompt = list(prompt)
    reused = _reuse_or_allocate(model, kv, prompt, len(prompt) + max_new_tokens)
    ones = torch.ones((1, len(prompt) + max_new_tokens), dtype=torch.long, device=device)
    out = model(
        input_ids=torch.tensor([prompt[reused:]], dtype=torch.long, device=device),
        attention_mask=ones[:, : len(prompt)],
        position_ids=torch.arange(reused, len(prompt), device=device)[None],
        past_key_values=kv.cache,
        use_cache=True,
        logits_to_keep=1,
    )
    kv.fed = prompt
    for produced in range(1, max_new_tokens + 1):
        token, _ = pick_tokens(out.logits[:, -1, :], temperature, top_k, generator)
        token_id = int(token)  # the host sync that streaming needs anyway
        yield token_id
        if token_id in stop_ids or produced == max_new_tokens:
            return
        position = len(kv.fed)
        out = model(
            input_ids=token[:, None],
            attention_mask=ones[:, : position + 1],
            position_ids=torch.tensor([[position]], device=device),
            past_key_values=kv.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        kv.fed.append(token_id)


def _reuse_or_allocate(model, kv: StreamCache, prompt: list[int], needed: int) -> int:
    """Make `kv` ready to take `prompt[reused:]` and `needed` positions in all; return `reused`, the prompt tokens
    already in the cache."""
    rewindable = kv.cache is not None and all(isinstance(layer, PreallocatedLayer) for layer in kv.cache.layers)
    if not rewindable:  # other layer kinds (sliding windows) cannot be rewound exactly: start afresh
        kv.capacity = needed
        kv.cache, kv.fed = preallocated_cache(model, kv.capacity), []
    elif needed > kv.capacity:
        kv.capacity = max(needed, 2 * kv.capacity)  # doubling: a growing conversation copies O(length) in all
        for layer in kv.cache.layers:
            layer.grow(kv.capacity)
    # At most len(prompt) - 1: the last prompt token is always fed again, its logits start the completion.
    reused = 0
    while reused < min(len(kv.fed), len(prompt) - 1) and kv.fed[reused] == prompt[reused]:
        reused += 1
    for layer in kv.cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.truncate(reused)
    kv.fed = prompt[:reused]
    return reused


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator,
    greedy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of `logits` [B, V]; return (tokens [B], untempered log-probs [B]).

    `greedy` [B] bool marks rows that take the argmax whatever the temperature (evaluation's greedy answer).
    The log-prob is log(softmax) at the token: exact to float32 rounding for any token that can be drawn.
    """
    logits = logits.float()  # bf16 logits would make the log-probs too coarse to compare with the trainer
    probs = torch.softmax(logits, dim=-1)
    if temperature == 0.0 or top_k == 1:
        token = logits.argmax(dim=-1)
    else:
        weights = probs if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            weights = weights.masked_fill(logits < kth, 0.0)
        token = draw(weights, generator)
        if greedy is not None:
            token = torch.where(greedy, logits.argmax(dim=-1), token)
    return token, probs.gather(1, token[:, None]).squeeze(1).log()


DRAW_BLOCK = 256


def draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row with probability proportional to `weights` [B, V] (≥ 0, each row with a positive sum).

    Two-level inverse-CDF sampling: pick a block of DRAW_BLOCK entries from the blocks' cumulative sums, then an
    entry inside it. `torch.multinomial` measured 1.0 s per call at 500 × 49152 on 2 CPU cores (half of a whole
    decode step); this is ~10 ms beyond the softmax. Cumulative sums run in float64 (float32 on MPS, which has no
    float64) and the in-block draw is
    rescaled to the block's own total, so a zero-weight entry is never drawn and rounding never shifts mass
    between blocks.
    """
    rows, vocab = weights.shape
    acc = accum_dtype(weights.device)  # float64, except on MPS (no float64 there): float32
    pad = (-vocab) % DRAW_BLOCK
    padded = torch.nn.functional.pad(weights, (0, pad)) if pad else weights  # padding copies all of [B, V]
    blocks = padded.view(rows, -1, DRAW_BLOCK)
    block_cdf = blocks.sum(dim=-1).to(acc).cumsum(dim=-1)
    u = torch.rand((rows, 1), generator=generator, dtype=acc, device=weights.device) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, u, right=True).clamp(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    fraction = (u - before) / (block_cdf.gather(1, block) - before)  # in [0, 1): where u falls inside the block
    inner_cdf = blocks[torch.arange(rows, device=weights.device), block.squeeze(1)].to(acc).cumsum(dim=-1)
    inner = torch.searchsorted(inner_cdf, fraction * inner_cdf[:, -1:], right=True).clamp(max=DRAW_BLOCK - 1)
    return (block * DRAW_BLOCK + inner).squeeze(1)


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
    tokens: list[list[int]], logprobs: list[list[float]], lengths: list[int], finished: list[bool],
    forced: list[list[bool]],
) -> list[Completion]:
    return [
        Completion(token_ids=t[:n], logprobs=lp[:n], finished=f, forced=fo[:n])
        for t, lp, n, f, fo in zip(tokens, logprobs, lengths, finished, forced, strict=True)
    ]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where sampling runs (rl.py uses it too)."""
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
