"""Chat rendering, the assistant-only loss mask on three template families, collation and packing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from integration_training.template import (
    IGNORE_INDEX,
    Rendered,
    collate_packed,
    collate_padded,
    format_masked_example,
    pack_greedy,
    render_conversation,
    render_conversations,
    render_examples,
    render_prompt,
    stop_token_ids,
)
from integration_training.data import Example
from integration_training.errors import UserError

# Written in the style of the Qwen2.5 family: ChatML with a default system turn, role attribute access.
QWEN25_STYLE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Written in the style of the Llama-3 family: BOS, header tokens, trimmed content, <|eot_id|> without newline.
LLAMA3_STYLE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
    {"role": "user", "content": "And spell cat."},
    {"role": "assistant", "content": "c-a-t, that is: «cat» 🐱"},
]


@pytest.fixture(scope="module")
def smol() -> Any:
    from transformers import AutoTokenizer

    from integration_training.models import provision_offline_model

    return AutoTokenizer.from_pretrained(str(provision_offline_model()))


def with_template(tokenizer: Any, template: str, specials: list[str] | None = None) -> Any:
    tok = copy.deepcopy(tokenizer)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def templates(smol: Any) -> dict[str, tuple[Any, str]]:
    """name → (tokenizer, end-of-turn token text)."""
    return {
        "smollm2": (smol, "<|im_end|>"),
        "qwen2.5-style": (with_template(smol, QWEN25_STYLE), "<|im_end|>"),
        "llama3-style": (with_template(smol, LLAMA3_STYLE, LLAMA3_SPECIALS), "<|eot_id|>"),
    }


def supervised_runs(rendered: Rendered) -> list[list[int]]:
    runs: list[list[int]] = []
    for k, (token, m) in enumerate(zip(rendered.input_ids, rendered.loss_mask)):
        if m:
            if k == 0 or not rendered.loss_mask[k - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5-style", "llama3-style"])
@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:]])
def test_mask_is_exactly_assistant_content_plus_end_of_turn(templates: dict, name: str, conversation: list) -> None:
    tokenizer, eot = templates[name]
    rendered = render_conversation(tokenizer, conversation)
    # the ids are what the template itself produces
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    runs = supervised_runs(rendered)
    assistants = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == [content + eot for content in assistants]
    # the unsupervised rest contains every system/user content and role header
    masked = tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.loss_mask) if not m])
    for message in conversation:
        if message["role"] != "assistant":
            assert message["content"] in masked
    assert "assistant" in masked
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    assert eot_id in stop_token_ids(tokenizer)


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5-style", "llama3-style"])
def test_prompt_is_a_token_prefix_of_the_training_rendering(templates: dict, name: str) -> None:
    tokenizer, _ = templates[name]
    rendered = render_conversation(tokenizer, CONVERSATION)
    for end in (2, 4):
        prompt = render_prompt(tokenizer, CONVERSATION[:end])
        full_text = tokenizer.decode(rendered.input_ids)
        assert full_text.startswith(tokenizer.decode(prompt))
        if name == "llama3-style":
            # SmolLM2's pre-tokenizer splits "\n\n" differently when text follows it, so with this borrowed
            # vocabulary only the text (not the token ids) of the prompt is a prefix. Real Llama-3 merges both.
            continue
        assert rendered.input_ids[: len(prompt)] == prompt
        assert rendered.loss_mask[len(prompt)] == 1 and rendered.loss_mask[len(prompt) - 1] == 0
        assert sum(rendered.loss_mask[: len(prompt)]) == (0 if end == 2 else len(supervised_runs(rendered)[0]))


def test_unreliable_templates_are_user_errors(smol: Any) -> None:
    shouting = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}" \
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(UserError, match="content"):
        render_conversation(with_template(smol, shouting), CONVERSATION[3:5])
    # the rendering depends on how many messages follow: prefixes are inconsistent
    counting = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ messages|length }}\n{{ m['content'] }}<|im_end|>\n" \
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(UserError, match="prefix"):
        render_conversation(with_template(smol, counting), CONVERSATION[1:3])
    no_end = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
        "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(UserError, match="end-of-turn"):
        render_conversation(with_template(smol, no_end), CONVERSATION[1:3])
    tok = copy.deepcopy(smol)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat_template"):
        render_conversation(tok, CONVERSATION[1:3])


# A tiny template of another shape: no role tokens, a BOS-like prefix, the end-of-turn token glued to the content.
TINY_STYLE = (
    "{{- '<s>' }}{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- 'A:' + m['content'] + '</s>' }}"
    "{%- else %}{{- m['role'][0] | upper + ':' + m['content'] + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'A:' }}{%- endif %}"
)


def generated_conversations(seed: int, count: int) -> list[list[dict[str, str]]]:
    """Random conversations: optional system turn, 1-4 exchanges, contents with unicode, digits, newlines, outer
    spaces (Llama-3 trims them) and calculator calls `<<EXPR=RESULT>>` (forced spans when tools are on)."""
    import random

    rng = random.Random(seed)
    words = ["the", "cat", "naïve", "🐱", "12", "3.5", "\n", "  ", "#### 7", "x=y", "<<2*3=6>>", "<<10/4=2.5>>",
             "a<<1+1=2>>b", "»", "end."]

    def text(n: int) -> str:
        body = "".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(n)).strip() or "ok"
        return rng.choice(["", " "]) + body + rng.choice(["", " ", "\n"])

    conversations = []
    for _ in range(count):
        messages = [{"role": "system", "content": text(3).strip() or "s"}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": text(rng.randint(1, 12)).strip() or "u"})
            messages.append({"role": "assistant", "content": text(rng.randint(1, 30))})
        conversations.append(messages)
    return conversations


@pytest.mark.parametrize("tools", [(), ("calculator",)])
@pytest.mark.parametrize("name", ["smollm2", "qwen2.5-style", "llama3-style", "tiny"])
def test_batched_rendering_equals_one_conversation_at_a_time(templates: dict, smol: Any, name: str, tools) -> None:
    tokenizer = with_template(smol, TINY_STYLE, ["<s>", "</s>"]) if name == "tiny" else templates[name][0]
    conversations = generated_conversations(seed=len(name) + len(tools), count=60)
    batched = render_conversations(tokenizer, conversations, tools)
    one_by_one = [render_conversation(tokenizer, c, tools) for c in conversations]
    assert batched == one_by_one
    assert any(0 in r.loss_mask and 1 in r.loss_mask for r in batched)
    if tools:  # forced spans exist in these conversations and are unsupervised (differs from rendering without)
        assert batched != render_conversations(tokenizer, conversations)


def test_batched_rendering_refuses_unreliable_templates_like_one_at_a_time(smol: Any) -> None:
    counting = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ messages|length }}\n{{ m['content'] }}<|im_end|>\n" \
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(UserError, match="prefix"):
        render_conversations(with_template(smol, counting), [CONVERSATION[1:3], CONVERSATION[1:5]])
    shouting = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}" \
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(UserError, match="content"):
        render_conversations(with_template(smol, shouting), [CONVERSATION[3:5]])
    tok = copy.deepcopy(smol)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat_template"):
        render_conversations(tok, [CONVERSATION[1:3]])
    assert render_conversations(smol, []) == []


def test_format_masked_example_marks_supervised_spans(smol: Any) -> None:
    shown = format_masked_example(smol, render_conversation(smol, CONVERSATION[1:3]))
    assert "«2 + 3 = 5\n#### 5<|im_end|>»" in shown
    assert shown.count("«") == 1 and "What is 2 + 3?" in shown


def example(user: str, answer: str, source: str) -> Example:
    return Example(({"role": "user", "content": user}, {"role": "assistant", "content": answer}), None, None, source)


def test_render_examples_reports_over_long_per_source(smol: Any) -> None:
    examples = [example("hi", "short", "a"), example("hi", "long " * 200, "a"), example("yo", "ok", "b")]
    kept, report = render_examples(smol, examples, max_length=100)
    assert len(kept) == 2 and report.dropped == 1
    by_source = {s.source: s for s in report.sources}
    assert (by_source["a"].total, by_source["a"].kept, by_source["a"].too_long) == (2, 1, 1)
    assert by_source["a"].longest > 100 and by_source["b"].too_long == 0
    assert any("longer than max_length=100" in line for line in report.lines())


def test_collate_padded_labels_are_pre_shifted() -> None:
    a = Rendered([10, 11, 12, 13], [0, 0, 1, 1])
    b = Rendered([20, 21], [0, 1])
    batch = collate_padded([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert batch.labels.tolist() == [[-100, 12, 13, -100], [21, -100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.num_supervised == 3


def test_pack_greedy_is_best_fit_in_order_and_fits() -> None:
    items = [Rendered([1] * n, [1] * n) for n in (5, 4, 3, 6, 1, 2)]
    rows = pack_greedy(items, max_length=10)
    assert [[len(r) for r in row] for row in rows] == [[5, 4, 1], [3, 6], [2]]
    assert pack_greedy(items, 10) == rows
    # Next-fit would need three rows here ([6], [6, 4], [4]); best-fit closes both rows exactly.
    tight = [Rendered([1] * n, [1] * n) for n in (6, 6, 4, 4)]
    assert [[len(r) for r in row] for row in pack_greedy(tight, 10)] == [[6, 4], [6, 4]]


def test_packed_logits_equal_separate_runs(smol: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).float().eval()
    conversations = [CONVERSATION[1:3], CONVERSATION, [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello!"}]]
    rendered = [render_conversation(smol, c) for c in conversations]
    width = sum(len(r) for r in rendered) + 7  # trailing padding is exercised too
    rows = pack_greedy(rendered, width)
    assert len(rows) == 1
    batch = collate_packed(rows, width, pad_id=smol.pad_token_id, attn_implementation="sdpa")
    assert batch.attention_mask.shape == (1, 1, width, width) and batch.attention_mask.dtype == torch.bool
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits[0]
        start = 0
        for r in rendered:
            alone = model(input_ids=torch.tensor([r.input_ids])).logits[0]
            torch.testing.assert_close(packed[start : start + len(r)], alone, atol=1e-5, rtol=0)
            assert batch.position_ids[0, start : start + len(r)].tolist() == list(range(len(r)))
            start += len(r)
    assert torch.isfinite(packed).all()
    # labels: each sample's own shifted labels, nothing crosses a sample boundary
    expected = collate_padded(rendered, pad_id=0).labels
    start = 0
    for b, r in enumerate(rendered):
        assert batch.labels[0, start : start + len(r)].tolist() == expected[b, : len(r)].tolist()
        start += len(r)
    assert (batch.labels[0, start:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------- packing per attention backend


def _random_docs(seed: int, vocab: int, count: int) -> list[Rendered]:
    """Generated conversations of random lengths and masks (first token never supervised)."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(count):
        n = int(torch.randint(3, 40, (1,), generator=gen))
        ids = torch.randint(1, vocab, (n,), generator=gen).tolist()
        mask = [0] + (torch.rand(n - 1, generator=gen) < 0.6).long().tolist()
        docs.append(Rendered(input_ids=ids, loss_mask=mask))
    return docs


def _tiny_llama(vocab: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).float()
    model.config._attn_implementation = attn
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_loss_and_gradients_equal_unpacked_per_backend(attn: str, seed: int) -> None:
    """Each CPU backend gets the mask form it needs; packed rows give the per-document loss and gradients."""
    from integration_training.sft import SupervisedTokenLoss

    vocab = 50
    docs = _random_docs(seed, vocab, 9)
    width = 96
    rows = pack_greedy(docs, width)
    assert len(rows) < len(docs)  # several documents do share rows

    def loss_and_grads(batches):
        model = _tiny_llama(vocab, attn)
        module = SupervisedTokenLoss(model, "float32", True)
        total = sum(module(b.input_ids, b.labels, b.attention_mask, b.position_ids) for b in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_loss, packed_grads = loss_and_grads([collate_packed(rows, width, 0, attn)])
    alone_loss, alone_grads = loss_and_grads([collate_padded([d], 0) for d in docs])
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)
    for name in alone_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_boolean_mask_would_be_wrong_for_eager() -> None:
    """Why eager gets an additive mask: transformers adds a 4-D mask to eager's scores, so a bool one isolates nothing."""
    vocab = 50
    docs = _random_docs(5, vocab, 2)
    width = len(docs[0]) + len(docs[1])
    model = _tiny_llama(vocab, "eager").eval()
    bool_batch = collate_packed([docs], width, 0, "sdpa")
    additive = collate_packed([docs], width, 0, "eager")
    assert additive.attention_mask.dtype == torch.float32
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([docs[1].input_ids])).logits[0]
        right = model(input_ids=additive.input_ids, attention_mask=additive.attention_mask,
                      position_ids=additive.position_ids).logits[0, len(docs[0]):]
        wrong = model(input_ids=bool_batch.input_ids, attention_mask=bool_batch.attention_mask,
                      position_ids=bool_batch.position_ids).logits[0, len(docs[0]):]
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    assert (wrong - alone).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_varlen_layout_gives_the_flash_kernels_each_document(attn: str) -> None:
    """The flash kernels take no 4-D mask: transformers derives document starts from position_ids, for a batch of
    one row. Checked with transformers' own derivation (the kernels need CUDA, which the tests do not have)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    docs = _random_docs(7, 50, 11)
    width = 80
    rows = pack_greedy(docs, width)
    batch = collate_packed(rows, width, 0, attn)
    assert batch.attention_mask is None and batch.input_ids.shape == (1, len(rows) * width)
    (cu_q, _), _ = prepare_fa_kwargs_from_position_ids(batch.position_ids)
    expected, start = [0], 0
    for row in rows:
        for d in row:
            start += len(d)
            expected.append(start)
        if start % width:  # the row's padding tail is a document of its own
            start += width - start % width
            expected.append(start)
    assert cu_q.tolist() == expected
    # Labels never cross a document (or row) boundary: the last label of every document is ignored.
    labels = batch.labels[0]
    assert all(int(labels[end - 1]) == IGNORE_INDEX for end in expected[1:])
    per_row = collate_packed(rows, width, 0, "sdpa")
    assert torch.equal(batch.labels.reshape(len(rows), width), per_row.labels)
    assert torch.equal(batch.input_ids.reshape(len(rows), width), per_row.input_ids)
