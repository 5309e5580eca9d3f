"""Rollout engine on a tiny random Llama: log-prob agreement, greedy parity with HF generate, per-row stop."""

from __future__ import annotations

import pytest
import torch
import transformers

from integration_training.rollout import (
    Completion,
    SamplingSettings,
    SpecialTokens,
    draw,
    left_pad,
    pick_tokens,
    preallocated_cache,
    sample,
    sequence_logprobs,
    shared_prefix_length,
)

VOCAB = 96
PAD = 0
# Different lengths so one batch exercises left padding; the first and last share nothing.
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [60, 61, 62, 63, 64], [8]]
# The same prompts behind a common "system prompt": prefill runs the shared prefix once and pads in the middle.
SYSTEM = [70, 71, 72, 73, 74, 75]
PREFIXED = [SYSTEM + p for p in PROMPTS]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # The tiny model's ops are too small to gain from threads, and on a shared CPU thread contention makes
    # them many times slower; restore the setting for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # A larger init gives peaked next-token distributions, so greedy comparisons are not decided by
        # near-ties in float noise.
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).float().eval()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(model, prompts=PROMPTS, num_samples=3, max_new_tokens=12, temperature=1.0, top_k=0,
         stop_ids=frozenset(), seed=0, batch_size=64) -> list[list[Completion]]:
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                batch_size=batch_size)
    return sample(model, prompts, num_samples=num_samples, settings=settings,
                  special=SpecialTokens(stop_ids=stop_ids, pad_id=PAD), generator=_gen(seed), greedy_first=False)


def _recompute(model, prompt: list[int], completion: list[int]) -> list[float]:
    ids, mask, pos = left_pad([prompt + completion], PAD, "cpu")
    completion_mask = torch.zeros_like(ids)
    completion_mask[:, len(prompt):] = 1
    with torch.inference_mode():
        logprobs = sequence_logprobs(model, ids, mask, pos, completion_mask)
    return logprobs[0, len(prompt):].tolist()


def _recompute_batched(model, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """Same as `_recompute` but all sequences in one left-padded batch (what a trainer would do)."""
    ids, mask, pos = left_pad([p + c for p, c in pairs], PAD, "cpu")
    completion_mask = torch.zeros_like(ids)
    for row, (_, c) in enumerate(pairs):
        completion_mask[row, ids.shape[1] - len(c):] = 1
    with torch.inference_mode():
        logprobs = sequence_logprobs(model, ids, mask, pos, completion_mask)
    return [logprobs[row, ids.shape[1] - len(c):].tolist() for row, (_, c) in enumerate(pairs)]


@pytest.mark.parametrize("prompts", [PROMPTS, PREFIXED], ids=["distinct", "shared-prefix"])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (0.7, 20)])
def test_logprobs_match_plain_forward(model, temperature, top_k, prompts):
    results = _run(model, prompts, temperature=temperature, top_k=top_k, batch_size=5)  # 12 rows, 3 uneven chunks
    pairs = []
    for prompt, completions in zip(prompts, results, strict=True):
        assert len(completions) == 3
        for completion in completions:
            assert len(completion.token_ids) == len(completion.logprobs) == 12
            expected = _recompute(model, prompt, completion.token_ids)
            torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(expected), atol=1e-4, rtol=0)
            pairs.append((prompt, completion.token_ids))
    flat = [c.logprobs for completions in results for c in completions]
    for got, expected in zip(flat, _recompute_batched(model, pairs), strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)


def _hf_greedy(model, prompts, max_new_tokens, stop_ids=()) -> list[list[int]]:
    ids, mask, _ = left_pad(prompts, PAD, "cpu")
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD,
        eos_token_id=list(stop_ids) or None,
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = out[:, ids.shape[1]:].tolist()
    trimmed = []
    for row in new:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        trimmed.append(row[:cut])
    return trimmed


@pytest.mark.parametrize("prompts", [PROMPTS, PREFIXED], ids=["distinct", "shared-prefix"])
def test_greedy_matches_hf_generate(model, prompts):
    expected = _hf_greedy(model, prompts, 16)
    for temperature, top_k in [(0.0, 0), (1.0, 1), (0.0, 5)]:
        results = _run(model, prompts, num_samples=2, max_new_tokens=16, temperature=temperature, top_k=top_k)
        for completions, want in zip(results, expected, strict=True):
            for completion in completions:
                assert completion.token_ids == want
                assert not completion.finished


def test_greedy_with_stop_matches_hf_generate(model):
    free = _hf_greedy(model, PROMPTS, 16)
    # Stop ids that greedy decoding actually emits mid-way for some rows but not others.
    stop_ids = frozenset({free[0][4], free[2][7]})
    expected = _hf_greedy(model, PROMPTS, 16, stop_ids)
    assert any(len(e) < 16 for e in expected) and any(len(e) == 16 for e in expected), expected
    results = _run(model, num_samples=2, max_new_tokens=16, temperature=0.0, stop_ids=stop_ids)
    for completions, want in zip(results, expected, strict=True):
        for completion in completions:
            assert completion.token_ids == want
            assert completion.finished == (want[-1] in stop_ids)


def test_shared_prefix_length_leaves_every_prompt_a_token():
    assert shared_prefix_length(PREFIXED) == len(SYSTEM)
    assert shared_prefix_length(PROMPTS) == 0
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert shared_prefix_length([[4, 5, 6]]) == 2


def test_preallocated_cache_fills_in_place_and_refuses_overflow(model):
    cache = preallocated_cache(model, capacity=6)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), past_key_values=cache, use_cache=True)
        buffer = cache.layers[0]._key_buffer
        model(input_ids=torch.tensor([[9, 10]]), past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 6 and cache.layers[0]._key_buffer is buffer  # no reallocation
        with pytest.raises(AssertionError, match="cache full"):
            model(input_ids=torch.tensor([[11]]), past_key_values=cache, use_cache=True)


def test_per_row_stop_invariants(model):
    stop_ids = frozenset(range(1, VOCAB, 9))  # ~10% of the vocab: rows stop at scattered steps
    max_new = 20
    results = _run(model, num_samples=8, max_new_tokens=max_new, stop_ids=stop_ids, batch_size=7, seed=3)
    lengths = set()
    for prompt, completions in zip(PROMPTS, results, strict=True):
        for completion in completions:
            tokens = completion.token_ids
            lengths.add(len(tokens))
            assert 1 <= len(tokens) <= max_new
            assert not any(t in stop_ids for t in tokens[:-1]), "nothing may follow a stop id"
            assert completion.finished == (tokens[-1] in stop_ids)
            if not completion.finished:
                assert len(tokens) == max_new
            # Log-probs stay correct for rows that kept decoding after others were dropped from the batch.
            expected = _recompute(model, prompt, tokens)
            torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(expected), atol=1e-4, rtol=0)
    assert len(lengths) > 2, f"stop ids should end rows at varied lengths, got {lengths}"
    assert any(c.finished for cs in results for c in cs)


def test_max_new_tokens_and_empty(model):
    for n in (1, 3):
        for completions in _run(model, max_new_tokens=n):
            assert all(len(c.token_ids) == n and not c.finished for c in completions)
    assert all(c.token_ids == [] for cs in _run(model, max_new_tokens=0) for c in cs)


def test_seed_reproducible_and_samples_differ(model):
    a = _run(model, num_samples=4, seed=7, batch_size=6)
    b = _run(model, num_samples=4, seed=7, batch_size=6)
    assert a == b
    c = _run(model, num_samples=4, seed=8, batch_size=6)
    assert a != c
    for completions in a:
        assert len({tuple(x.token_ids) for x in completions}) > 1, "samples of one prompt should differ"


def test_restores_training_mode(model):
    model.train()
    try:
        _run(model, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_greedy_first_row_is_greedy_and_the_rest_sample(model):
    greedy = _run(model, num_samples=1, temperature=0.0, max_new_tokens=8)
    mixed = sample(model, PROMPTS, num_samples=4, settings=SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=0, batch_size=64),
                   special=SpecialTokens(stop_ids=frozenset(), pad_id=PAD), generator=_gen(3), greedy_first=True)
    for p in range(len(PROMPTS)):
        assert mixed[p][0].token_ids == greedy[p][0].token_ids
        torch.testing.assert_close(torch.tensor(mixed[p][0].logprobs), torch.tensor(greedy[p][0].logprobs),
                                   rtol=1e-4, atol=1e-4)
    assert any(mixed[p][s].token_ids != mixed[p][0].token_ids for p in range(len(PROMPTS)) for s in (1, 2, 3))


def test_draw_matches_the_weights_across_blocks_and_never_draws_a_zero():
    # 600 entries = 2 full blocks + a padded third; mass split over all three, most entries zero.
    weights = torch.zeros(600)
    weights[[3, 255, 256, 300, 599]] = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    draws = draw(weights.expand(100_000, -1).contiguous(), _gen(1))
    counts = torch.bincount(draws, minlength=600).double() / draws.numel()
    assert set(torch.nonzero(counts).squeeze(1).tolist()) <= {3, 255, 256, 300, 599}
    # 4.5 standard errors of a proportion near 0.3 over 1e5 draws: ~0.0065.
    torch.testing.assert_close(counts[[3, 255, 256, 300, 599]], weights[[3, 255, 256, 300, 599]].double(),
                               atol=0.0065, rtol=0)


def test_pick_tokens_greedy_rows_take_the_argmax_and_all_rows_report_untempered_logprobs():
    logits = torch.randn(64, VOCAB, generator=_gen(2)) * 3
    greedy = torch.arange(64) % 2 == 0
    token, logprob = pick_tokens(logits, 1.5, 0, _gen(3), greedy)
    assert torch.equal(token[greedy], logits.argmax(-1)[greedy])
    assert not torch.equal(token[~greedy], logits.argmax(-1)[~greedy])  # hot sampling leaves the argmax often
    expected = torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
    torch.testing.assert_close(logprob, expected, atol=1e-5, rtol=0)


class _NoGradForward:
    """Runs the model's forward with inference mode off, as FSDP2's lockstep proxy (distributed.LockstepModel) does."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.model(*args, **kwargs)


def test_sampling_through_a_forward_outside_inference_mode_matches(model):
    # Shared prefix + several samples: exercises the cache's buffer creation, gather and in-place writes.
    expected = _run(model, PREFIXED, num_samples=3, max_new_tokens=10, batch_size=5)
    got = _run(_NoGradForward(model), PREFIXED, num_samples=3, max_new_tokens=10, batch_size=5)
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in expected]
