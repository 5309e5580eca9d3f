"""Chat rendering with the model's own template, the assistant-only loss mask, padding and packing collation.

The mask is derived from character offsets, never from a hand-written per-model template:
  P_i = template(messages[:i], add_generation_prompt=True)   # everything up to where assistant turn i begins
  T_i = template(messages[:i+1])                             # ... plus that turn
The full rendering must start with T_i and T_i with P_i (prefix consistency: otherwise the prompt used for
generation is not what training saw). The assistant content must follow P_i verbatim; the first special token
after it (only whitespace allowed in between) is the end-of-turn token. Tokens overlapping that character span
are supervised. Anything else is a UserError — a silent full-sequence loss would train on prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from integration_training.data.types import Example
from integration_training.errors import UserError

IGNORE_INDEX = -100

# Templates that print today's date (Llama-3.x: `date_string`, else `strftime_now("%d %b %Y")`) would change the
# tokens (and the packing) across midnight and break exact resume. Every rendering passes this fixed date instead;
# it is Llama-3.1's own fallback date. Shown in the plan.
FIXED_DATE_STRING = "26 Jul 2024"


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 = supervised (assistant content + its end-of-turn token)

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.loss_mask), "one mask entry per token"

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, pre-shifted: labels[b, t] = input_ids[b, t+1] if supervised else -100
    # [B, T] long (padding); packed rows: [B, 1, T, T] bool or additive float block-diagonal causal, or None
    # (flash varlen: documents from position_ids) — see collate_packed
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 for every packed sample

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- rendering


def _template_text(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat_template; use an instruct/chat "
            "model or a tokenizer that defines one"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt,
        date_string=FIXED_DATE_STRING,
    )
    assert isinstance(text, str), "apply_chat_template(tokenize=False) returns text"
    return text


def _encode(tokenizer: Any, text: str, offsets: bool) -> Any:
    # The template already wrote BOS/role tokens as text; adding special tokens again would double BOS.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


def _special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
    return frozenset(ids)


def _assistant_char_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]], full: str) -> list[tuple[int, int]]:
    """Per assistant turn: (content start, content end) in `full`, checked for prefix consistency."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _template_text(tokenizer, messages[:i], generation_prompt=True)
        with_turn = _template_text(tokenizer, messages[: i + 1], generation_prompt=False)
        if not with_turn.startswith(prompt) or not full.startswith(with_turn):
            raise UserError(
                f"chat template of {getattr(tokenizer, 'name_or_path', '?')} is not prefix-consistent at assistant "
                f"turn {i} (rendering a prefix of the conversation changes earlier text), so the assistant loss "
                "mask cannot be derived reliably; use a model whose template renders conversations incrementally"
            )
        rest = with_turn[len(prompt) :]
        content = message["content"]
        # Some templates (Llama-3) trim the content; accept exactly that and nothing looser.
        # dict.fromkeys: try the content as is, then trimmed (only differs when it has outer whitespace).
        for candidate in dict.fromkeys((content, content.strip())):
            if rest.startswith(candidate):
                spans.append((len(prompt), len(prompt) + len(candidate)))
                break
        else:
            raise UserError(
                f"chat template of {getattr(tokenizer, 'name_or_path', '?')}: assistant turn {i}'s content does not "
                "follow the generation prompt verbatim, so the assistant loss mask cannot be derived reliably"
            )
    return spans


def render_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]], tools: Sequence[str] = ()) -> Rendered:
    """Token ids of the conversation and a mask that is 1 on each assistant content + its end-of-turn token.

    `tools` non-empty (the config's `data.tools`): every forced span `RESULT>>` after a `<<EXPR=` in an assistant
    turn is tokenised on its own with `tools.forced_token_ids` (as the rollout engine forces it; the text before and
    after it is tokenised separately too, as sampling produces it) and gets loss mask 0: the engine writes it, the
    model never has to. Empty `tools`: the whole text is tokenised at once, as before tools existed.
    """
    assert messages and messages[-1]["role"] == "assistant", "a training conversation ends with the assistant"
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the assistant loss mask needs a fast (Rust) tokenizer with offset mapping")
    full = _template_text(tokenizer, messages, generation_prompt=False)
    assistant_spans = _assistant_char_spans(tokenizer, messages, full)
    forced_spans = _forced_spans(full, assistant_spans) if tools else []
    ids, offset_list, forced = _encode_segments(tokenizer, full, forced_spans)
    # numpy over the token axis: the per-token Python loops were most of the rendering time on long conversations.
    offsets = np.asarray(offset_list, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    is_special = np.isin(np.asarray(ids, dtype=np.int64), np.fromiter(_special_ids(tokenizer), dtype=np.int64))
    mask = np.zeros(len(ids), dtype=np.int8)
    for start, end in assistant_spans:
        # The end-of-turn token: the first special token starting at/after the content, whitespace between.
        candidates = np.flatnonzero((starts >= end) & is_special)
        eot = int(candidates[0]) if len(candidates) else None
        if eot is None or full[end : int(starts[eot])].strip():
            raise UserError(
                f"chat template of {getattr(tokenizer, 'name_or_path', '?')}: no end-of-turn special token right "
                "after an assistant turn, so the assistant loss mask cannot be derived reliably"
            )
        stop = int(ends[eot])
        overlaps = (starts < stop) & (ends > start)
        empty_inside = (starts == ends) & (starts >= start) & (starts < stop)
        mask[overlaps | empty_inside] = 1
        assert mask[eot] == 1
    mask[np.asarray(forced, dtype=bool)] = 0  # forced tool spans: context the engine writes, never a target
    mask = mask.tolist()
    assert any(mask), "every assistant turn contributes supervised tokens"
    return Rendered(input_ids=ids, loss_mask=mask)


def _forced_spans(full: str, assistant_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans of the forced `RESULT>>` texts inside assistant contents, in order."""
    from integration_training.tools import forced_char_spans

    spans = []
    for start, end in assistant_spans:
        spans += [(start + s, start + e) for s, e in forced_char_spans(full[start:end])]
    return spans


def _encode_segments(
    tokenizer: Any, full: str, forced_spans: Sequence[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """(ids, character offsets, forced flags): `full` tokenised in one piece when there are no forced spans, else
    cut at every forced span's edges, each forced span encoded with `forced_token_ids` (its tokens' offsets cover
    the whole span), each other piece with offsets shifted to `full`'s coordinates."""
    from integration_training.tools import forced_token_ids

    if not forced_spans:
        encoded = _encode(tokenizer, full, offsets=True)
        ids = list(encoded["input_ids"])
        return ids, [tuple(o) for o in encoded["offset_mapping"]], [False] * len(ids)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    forced: list[bool] = []
    cursor = 0
    for start, end in [*forced_spans, (len(full), len(full))]:
        assert cursor <= start <= end, "forced spans are ordered and disjoint"
        if start > cursor:
            encoded = _encode(tokenizer, full[cursor:start], offsets=True)
            ids += encoded["input_ids"]
            offsets += [(cursor + s, cursor + e) for s, e in encoded["offset_mapping"]]
            forced += [False] * len(encoded["input_ids"])
        if end > start:
            span_ids = forced_token_ids(tokenizer, full[start:end])
            ids += span_ids
            offsets += [(start, end)] * len(span_ids)
            forced += [True] * len(span_ids)
        cursor = end
    return ids, offsets, forced


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` (ending with a user turn) plus the template's generation prompt."""
    assert messages and messages[-1]["role"] != "assistant", "a prompt ends before the assistant's answer"
    return list(_encode(tokenizer, _template_text(tokenizer, messages, generation_prompt=True), offsets=False)["input_ids"])


def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """EOS plus the template's end-of-turn token (found by rendering a probe conversation)."""
    probe = render_conversation(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    last_supervised = max(k for k, m in enumerate(probe.loss_mask) if m)
    ids = {probe.input_ids[last_supervised]}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


# ---------------------------------------------------------------- length filtering


@dataclass(frozen=True)
class SourceLengths:
    source: str
    total: int
    kept: int
    too_long: int
    longest: int  # tokens of the longest conversation, kept or not


@dataclass(frozen=True)
class LengthReport:
    max_length: int
    sources: tuple[SourceLengths, ...]

    @property
    def dropped(self) -> int:
        return sum(s.too_long for s in self.sources)

    def lines(self) -> list[str]:
        out = []
        for s in self.sources:
            note = f", {s.too_long} longer than max_length={self.max_length} (not trained on)" if s.too_long else ""
            out.append(f"{s.source}: {s.kept}/{s.total} kept, longest {s.longest} tokens{note}")
        return out


def render_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int, tools: Sequence[str] = ()
) -> tuple[list[Rendered], LengthReport]:
    """Render every example (forced tool spans unsupervised when `tools` is non-empty, see `render_conversation`);
    conversations over `max_length` tokens are dropped and counted per source."""
    assert max_length > 0
    kept: list[Rendered] = []
    stats: dict[str, list[int]] = {}  # source → [total, kept, too_long, longest]; insertion order = first seen
    for example in examples:
        rendered = render_conversation(tokenizer, example.messages, tools)
        row = stats.setdefault(example.source, [0, 0, 0, 0])
        row[0] += 1
        row[3] = max(row[3], len(rendered))
        if len(rendered) > max_length:
            row[2] += 1  # truncating would cut the answer or its end-of-turn token: drop and report instead
        else:
            row[1] += 1
            kept.append(rendered)
    report = LengthReport(max_length, tuple(SourceLengths(s, *v) for s, v in stats.items()))
    assert len(kept) + report.dropped == len(examples)
    return kept, report


# ---------------------------------------------------------------- collation


def shifted_labels(rendered: Rendered) -> list[int]:
    """labels[t] = the token to predict at t (input_ids[t+1]) when it is supervised, else -100."""
    ids, mask = rendered.input_ids, rendered.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def collate_padded(rendered_list: Sequence[Rendered], pad_id: int) -> Batch:
    """Right-padded batch with a 2-D padding mask."""
    assert rendered_list, "empty batch"
    width = max(len(r) for r in rendered_list)
    input_ids = torch.full((len(rendered_list), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rendered_list), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rendered_list), width), dtype=torch.long)
    for b, r in enumerate(rendered_list):
        n = len(r)
        input_ids[b, :n] = torch.tensor(r.input_ids)
        labels[b, :n] = torch.tensor(shifted_labels(r))
        attention[b, :n] = 1
    positions = torch.arange(width, dtype=torch.long).expand(len(rendered_list), width).clone()
    return Batch(input_ids=input_ids, labels=labels, attention_mask=attention, position_ids=positions)


def pack_greedy(rendered_list: Sequence[Rendered], max_length: int) -> list[list[Rendered]]:
    """Online best-fit: each conversation, in order, joins the open row it fills most tightly, else a new row.

    Deterministic (ties go to the earliest row), keeps the caller's order within each row, and fills rows far
    better than next-fit (measured on GSM8K rows: 97% vs 80% of max_length), so less compute is padding. Open
    rows are bucketed by free space (`data.packing`), so this is O(n log n), not conversations × rows.
    """
    from integration_training.data.packing import best_fit  # data imports this module; import at call time

    assert all(len(r) <= max_length for r in rendered_list), "render_examples drops over-long conversations first"
    row_of = best_fit([len(r) for r in rendered_list], max_length)
    rows: list[list[Rendered]] = [[] for _ in range(int(row_of.max()) + 1 if len(row_of) else 0)]
    for r, row in zip(rendered_list, row_of.tolist(), strict=True):
        rows[row].append(r)
    return rows


# How each attention backend is told where packed documents begin (measured with transformers 5.23: per-document
# `position_ids` alone isolate nothing for sdpa or eager; a boolean 4-D mask works for sdpa, but eager *adds* the
# mask to the scores, so it needs 0 / -inf; the flash-attention kernels read document starts from `position_ids`
# (their varlen path) and take no 4-D mask). Backends not listed cannot train on packed rows; config validation
# refuses them with packing=True.
PACKED_MASK_KINDS = {"sdpa": "bool", "eager": "additive", "flash_attention_2": "varlen", "flash_attention_3": "varlen"}


def packed_mask_kind(attn_implementation: str) -> str:
    assert attn_implementation in PACKED_MASK_KINDS, f"no packed-row mask for attention backend {attn_implementation}"
    return PACKED_MASK_KINDS[attn_implementation]


def collate_packed(rows: Sequence[Sequence[Rendered]], max_length: int, pad_id: int, attn_implementation: str) -> Batch:
    """Packed rows of width `max_length`; each document attends only to itself, in the backend's own form.

    `position_ids` restart at 0 for every document (and for the padding tail, which forms a document of its own
    whose labels are -100). The attention mask is `packed_mask_kind(attn_implementation)`:
    "bool" — [B, 1, T, T] block-diagonal causal, True = may attend (padding attends only to itself: an all-masked
    row gives NaN in SDPA); "additive" — the same as 0 / dtype-min float32; "varlen" — None (the kernel derives
    document boundaries from `position_ids`, with no T×T memory).
    """
    assert rows, "empty batch"
    kind = packed_mask_kind(attn_implementation)
    input_ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), max_length), dtype=torch.long)
    blocks = torch.zeros((len(rows), 1, max_length, max_length), dtype=torch.bool) if kind != "varlen" else None
    for b, row in enumerate(rows):
        start = 0
        for r in row:
            end = start + len(r)
            assert end <= max_length, "row longer than max_length; use pack_greedy"
            input_ids[b, start:end] = torch.tensor(r.input_ids)
            labels[b, start:end] = torch.tensor(shifted_labels(r))
            positions[b, start:end] = torch.arange(len(r))
            if blocks is not None:
                blocks[b, 0, start:end, start:end] = torch.ones(len(r), len(r), dtype=torch.bool).tril()
            start = end
        positions[b, start:] = torch.arange(max_length - start)
        if blocks is not None:
            pad = torch.arange(start, max_length)
            blocks[b, 0, pad, pad] = True
    if kind == "varlen":
        # transformers takes the varlen path only for a batch of one row (`_is_packed_sequence`): lay the B packed
        # rows end to end. Labels are pre-shifted and every row ends in -100, so nothing crosses a row boundary.
        flat = lambda t: t.reshape(1, -1)  # noqa: E731
        return Batch(input_ids=flat(input_ids), labels=flat(labels), attention_mask=None, position_ids=flat(positions))
    return Batch(input_ids=input_ids, labels=labels, attention_mask=_packed_mask(blocks, kind), position_ids=positions)


def _packed_mask(blocks: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    if kind == "bool":
        return blocks
    if kind == "additive":
        assert blocks is not None
        return torch.zeros(blocks.shape, dtype=torch.float32).masked_fill_(~blocks, torch.finfo(torch.float32).min)
    assert kind == "varlen" and blocks is None
    return None


# ---------------------------------------------------------------- display


def format_masked_example(tokenizer: Any, rendered: Rendered) -> str:
    """The decoded example with supervised spans wrapped in «…», for the --dry-run plan."""
    pieces: list[str] = []
    k = 0
    while k < len(rendered):
        j = k
        while j < len(rendered) and rendered.loss_mask[j] == rendered.loss_mask[k]:
            j += 1
        text = tokenizer.decode(rendered.input_ids[k:j], skip_special_tokens=False)
        pieces.append(f"«{text}»" if rendered.loss_mask[k] else text)
        k = j
    return "".join(pieces)
