"""Tool use end to end: the rollout engine's forced-token queues, SFT masks on forced spans, RL gradients."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers

from integration_training.rollout import left_pad, sample, sequence_logprobs
from integration_training.tools import ToolRunner, forced_text, forced_token_ids, pending_call

VOCAB = 96
PAD = 0
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [60, 61, 62, 63, 64], [8]]
# Token id → text for a toy tokenizer whose vocabulary makes calls frequent under random sampling.
PIECES = ["<<", "1", "2", "3", "+", "-", "*", "/", "=", ">>", " ", "x", "(", ")", ".", "?"]


class ToyTokenizer:
    """Just what `ToolRunner` uses: decode, encode (greedy longest piece), len."""

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join("" if i == PAD else PIECES[i % len(PIECES)] for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids, position = [], 0
        while position < len(text):
            piece = next((p for p in sorted(PIECES, key=len, reverse=True) if text.startswith(p, position)), None)
            ids.append(PIECES.index(piece) if piece not in (None, "<<") else (len(PIECES) if piece else 15))
            position += len(piece) if piece else 1  # characters outside the toy vocabulary become "?"
        return {"input_ids": ids}


@pytest.fixture(scope="module")
def model():
    return toy_model()


def toy_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=PAD,
        bos_token_id=None, eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).float().eval()


def _sample(model, tools, num_samples=4, max_new_tokens=24, temperature=1.0, batch_size=64, seed=0,
            greedy_first=False, stop_ids=frozenset()):
    return sample(model, PROMPTS, num_samples, max_new_tokens, temperature, 0, stop_ids, PAD,
                  torch.Generator().manual_seed(seed), batch_size, greedy_first=greedy_first, tools=tools)


def _expected_forced(tokenizer, tokens: list[int], forced: list[bool]) -> list[bool]:
    """Replay the protocol on a finished completion: which positions must be forced, and check their ids."""
    want = [False] * len(tokens)
    i = 1
    while i <= len(tokens):
        if not (i >= 1 and not want[i - 1]):
            i += 1
            continue
        expression = pending_call(tokenizer.decode(tokens[:i][-ToolRunner.TAIL_TOKENS:]))
        if expression is None:
            i += 1
            continue
        ids = forced_token_ids(tokenizer, forced_text(expression))
        span = tokens[i : i + len(ids)]
        assert span == ids[: len(span)], (tokenizer.decode(tokens), expression)
        for j in range(i, i + len(span)):
            want[j] = True
        i += len(span) + 1
    return want


@pytest.mark.parametrize("batch_size", [64, 5])
def test_forced_tokens_follow_every_open_call(model, batch_size):
    tokenizer = ToyTokenizer()
    results = _sample(model, ToolRunner(tokenizer, ["calculator"]), num_samples=8, max_new_tokens=40,
                      batch_size=batch_size)
    calls = 0
    pairs = []
    for prompt, group in zip(PROMPTS, results, strict=True):
        for c in group:
            assert len(c.forced) == len(c.token_ids) == len(c.logprobs)
            assert c.forced == _expected_forced(tokenizer, c.token_ids, c.forced)
            assert all(lp == 0.0 for lp, f in zip(c.logprobs, c.forced) if f)
            calls += sum(1 for k in range(1, len(c.forced)) if c.forced[k] and not c.forced[k - 1])
            pairs.append((prompt, c))
    assert calls >= 3, "the toy vocabulary should make several calls"
    # The cache saw the forced tokens: drawn tokens' log-probs equal a plain forward over prompt + completion.
    for prompt, c in pairs:
        ids, mask, pos = left_pad([prompt + c.token_ids], PAD, "cpu")
        completion_mask = torch.zeros_like(ids)
        completion_mask[:, len(prompt):] = 1
        with torch.inference_mode():
            expected = sequence_logprobs(model, ids, mask, pos, completion_mask)[0, len(prompt):]
        drawn = torch.tensor([not f for f in c.forced])
        torch.testing.assert_close(torch.tensor(c.logprobs)[drawn], expected[drawn], atol=1e-4, rtol=0)


def test_forced_tokens_with_greedy_first_stops_and_compaction(model):
    tokenizer = ToyTokenizer()
    stop = frozenset({13, 27})  # ")" ids: rows stop at different steps, so compaction runs mid-call
    results = _sample(model, ToolRunner(tokenizer, ["calculator"]), num_samples=6, max_new_tokens=30,
                      greedy_first=True, stop_ids=stop)
    greedy_alone = _sample(model, ToolRunner(tokenizer, ["calculator"]), num_samples=1, max_new_tokens=30,
                           temperature=0.0, stop_ids=stop)
    for group, alone in zip(results, greedy_alone, strict=True):
        assert group[0].token_ids == alone[0].token_ids  # greedy-first row = a greedy run
        for c in group:
            assert c.forced == _expected_forced(tokenizer, c.token_ids, c.forced)
            assert not any(f for t, f in zip(c.token_ids, c.forced) if t in stop)


def _digest(results) -> str:
    flat = [[c.token_ids, [round(lp, 4) for lp in c.logprobs], c.finished] for g in results for c in g]
    return hashlib.sha256(json.dumps(flat).encode()).hexdigest()[:16]


def test_tools_off_is_the_plain_sampler(model):
    """Tools off: every Completion's tokens/log-probs are what the sampler produced before tools existed
    (digests recorded from the engine before this change), and nothing is marked forced."""
    runs = {
        "sampled": _sample(model, None, batch_size=5),
        "greedy_first": _sample(model, None, greedy_first=True, stop_ids=frozenset({13})),
    }
    assert all(not any(c.forced) for r in runs.values() for g in r for c in g)
    assert {k: _digest(v) for k, v in runs.items()} == TOOLS_OFF_DIGESTS


TOOLS_OFF_DIGESTS = {"sampled": "4953fe370236f225", "greedy_first": "126732f3fa0c7d98"}


# ---------------------------------------------------------------------------------------------------- SFT rendering

ANSWERS = [
    "She sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72",
    "<<1,000*3=3000>>3000 then <<3000-4500=-1500>>-1500.\n#### -1500",
    "Each is <<10/4=2.5>>2.5 (a half), <<2.5*2=5>>5!\n#### 5",
    "No calls here: 2 + 2 = 4\n#### 4",
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_sft_mask_is_zero_exactly_on_forced_spans(answer):
    from helpers import smollm2_tokenizer

    from integration_training.template import render_conversation, render_prompt
    from integration_training.tools import forced_char_spans

    tokenizer = smollm2_tokenizer()
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": answer}]
    plain = render_conversation(tokenizer, messages)
    with_tools = render_conversation(tokenizer, messages, ["calculator"])
    prompt = render_prompt(tokenizer, messages[:-1])
    assert with_tools.input_ids[: len(prompt)] == prompt
    end = max(k for k, m in enumerate(with_tools.loss_mask) if m) + 1  # through the end-of-turn token
    completion = with_tools.input_ids[len(prompt):end]
    mask = with_tools.loss_mask[len(prompt):end]
    spans = [answer[s:e] for s, e in forced_char_spans(answer)]
    # The unsupervised runs inside the completion are exactly the forced spans, each tokenised on its own.
    runs, k = [], 0
    while k < len(mask):
        if mask[k] == 0:
            j = k
            while j < len(mask) and mask[j] == 0:
                j += 1
            runs.append((k, j))
            k = j
        else:
            k += 1
    assert [tokenizer.decode(completion[a:b]) for a, b in runs] == spans
    assert [completion[a:b] for a, b in runs] == [forced_token_ids(tokenizer, s) for s in spans]
    # And the engine, given the drawn tokens before each span, forces exactly those tokens.
    runner = ToolRunner(tokenizer, ["calculator"])
    table = runner.ends_with_equals(len(tokenizer), "cpu")
    for a, b in runs:
        assert bool(table[completion[a - 1]]), "the token before a forced span ends with '='"
        expression = pending_call(tokenizer.decode(completion[:a]))
        assert runner.forced_for(completion[:a]) == completion[a:b]
        assert tokenizer.decode(completion[a:b]) == forced_text(expression)
    if not spans:
        assert with_tools == plain  # nothing to force: identical to rendering without tools


# ---------------------------------------------------------------------------------------------------- RL


@pytest.mark.parametrize("use_ratio,kl_coef", [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)])
def test_forced_tokens_carry_no_policy_gradient(use_ratio, kl_coef):
    from integration_training.rl import policy_loss

    torch.manual_seed(0)
    n = 40
    drawn = (torch.rand(n) > 0.4).float()
    drawn[0] = 1.0
    base = torch.randn(n, requires_grad=True)
    old, ref, adv = torch.randn(n), torch.randn(n), torch.randn(n)

    def grads(perturbation: torch.Tensor):
        shift = torch.zeros((), requires_grad=True)  # a parameter that only moves forced tokens' log-probs
        forced = drawn == 0
        logprobs = torch.where(forced, base - 1.0 + perturbation + shift * 50.0, base - 1.0)
        loss, parts = policy_loss(logprobs, torch.where(forced, old + perturbation, old),
                                  torch.where(forced, ref + 3 * perturbation, ref),
                                  adv, normaliser=float(drawn.sum()), kl_coef=kl_coef, clip_eps=0.2,
                                  use_ratio=use_ratio, drawn=drawn)
        base.grad = None
        loss.backward()
        return loss.detach(), base.grad.clone(), shift.grad, {k: v.clone() for k, v in parts.items()}

    loss0, grad0, shift0, parts0 = grads(torch.zeros(n))
    for scale in (0.5, 30.0, float("inf")):
        loss1, grad1, shift1, parts1 = grads(torch.randn(n) * scale if scale != float("inf") else torch.full((n,), -float("inf")))
        assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
        assert float(shift1) == 0.0 and torch.equal(grad1 * (1.0 - drawn), torch.zeros(n))
        assert all(torch.equal(parts0[k], parts1[k]) for k in parts0)
    assert float(shift0) == 0.0


def test_train_on_rows_excludes_forced_tokens_from_normaliser_and_statistics():
    """A row with forced tokens trains exactly like the same row whose forced tokens are all drawn but carry zero
    advantage... except the normaliser: checked by comparing against a hand-built loss over drawn tokens."""
    from helpers import tiny_model

    from integration_training.config import ModelConfig
    from integration_training.rl import Sequence_, build_batch, completion_logprobs

    model = tiny_model(96, seed=0)
    prompt = [5, 6, 7]
    rows = [
        Sequence_(prompt, [10, 11, 12, 13, 14], [0.0] * 5, 1.0, 1.0, (False, False, True, True, False)),
        Sequence_(prompt, [20, 21, 22], [0.0] * 3, -1.0, 0.0, (False, False, False)),
    ]
    batch = build_batch(rows, 0, torch.device("cpu"))
    assert batch.drawn.tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    logprobs, _ = completion_logprobs(model, batch, False, "float32")
    from integration_training.rl import policy_loss

    loss, _ = policy_loss(logprobs, batch.old_logprobs, None, batch.advantages, 6.0, 0.0, 0.2, False, drawn=batch.drawn)
    expected = -(logprobs * batch.advantages * batch.drawn).sum() / 6.0
    torch.testing.assert_close(loss, expected)
    assert rows[0].num_drawn == 3 and rows[1].num_drawn == 3
    del ModelConfig
