"""Tool use end to end: the rollout engine's forced-token queues, SFT masks on forced spans, RL gradients."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import transformers

from integration_training.rollout import SamplingSettings, SpecialTokens, left_pad, sample, sequence_logprobs
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
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, batch_size=batch_size)
    return sample(model, PROMPTS, num_samples=num_samples, settings=settings,
                  special=SpecialTokens(stop_ids=stop_ids, pad_id=PAD), generator=torch.Generator().manual_seed(seed),
                  greedy_first=greedy_first, tools=tools)


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
            assert c.finished == (bool(c.token_ids) and c.token_ids[-1] in stop)
            assert not any(t in stop for t in c.token_ids[:-1])  # forced or drawn, a stop id ends the row


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
    from integration_training.rl import PolicyLossInputs, policy_loss

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
        inputs = PolicyLossInputs(logprobs=logprobs, old_logprobs=torch.where(forced, old + perturbation, old),
                                  advantages=adv, ref_logprobs=torch.where(forced, ref + 3 * perturbation, ref),
                                  drawn=drawn)
        loss, parts = policy_loss(inputs, normaliser=float(drawn.sum()), kl_coef=kl_coef, clip_eps=0.2,
                                  use_ratio=use_ratio)
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
    from integration_training.rl import PolicyLossInputs, policy_loss

    inputs = PolicyLossInputs(logprobs=logprobs, old_logprobs=batch.old_logprobs, advantages=batch.advantages,
                              drawn=batch.drawn)
    loss, _ = policy_loss(inputs, normaliser=6.0, kl_coef=0.0, clip_eps=0.2, use_ratio=False)
    expected = -(logprobs * batch.advantages * batch.drawn).sum() / 6.0
    torch.testing.assert_close(loss, expected)
    assert rows[0].num_drawn == 3 and rows[1].num_drawn == 3
    del ModelConfig


# ---------------------------------------------------------------------------------------------------- config, data, CLI

# Made-up worked answers in GSM8K's row schema (no GSM8K text): annotations with an annotator-style result ("6.00")
# and one the calculator refuses (floor division).
TOOL_ROWS = [
    {"question": f"Sam has {a} boxes of {b} pens and gives away {c}. How many pens are left?",
     "answer": f"Pens: {a}*{b} = <<{a}*{b}={a * b}.00>>{a * b}\nLeft: {a * b}-{c} = <<{a * b}-{c}={a * b - c}>>"
               f"{a * b - c}\n#### {a * b - c}"}
    for a, b, c in [(3, 2, 1), (4, 5, 6), (7, 8, 9), (2, 9, 4), (6, 6, 5), (5, 3, 2)]
] + [{"question": "Halve 9 and drop the rest.", "answer": "9//2 = <<9//2=4>>4\n#### 4"}]


def _tool_rows_file(tmp_path):
    path = tmp_path / "tool_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    return path


def _gsm8k_spec(path, max_samples=None):
    from integration_training.config import DatasetSpec

    return DatasetSpec(name="openai/gsm8k", split="train", subset=None, max_samples=max_samples, repeat=1,
                       path=str(path), reward=None)


def test_gsm8k_keeps_annotations_only_with_the_calculator(tmp_path):
    from integration_training.data import load_source

    spec = _gsm8k_spec(_tool_rows_file(tmp_path))
    off = load_source(spec, 0)
    on = load_source_counted_with_tools(spec)
    assert all("<<" not in e.messages[1]["content"] for e in off)
    assert [e.reference for e in on] == [e.reference for e in off]
    first = on[0].messages[1]["content"]
    assert "<<3*2=6>>6" in first and "<<6-1=5>>5" in first  # the annotator's "6.00" becomes the calculator's "6"
    assert on[-1].messages[1]["content"] == off[-1].messages[1]["content"] == "9//2 = 4\n#### 4"  # refused: removed
    for e_on, e_off in zip(on, off, strict=True):
        assert re.sub(r"<<[^<>]*>>", "", e_on.messages[1]["content"]) == e_off.messages[1]["content"]


def load_source_counted_with_tools(spec):
    from integration_training.data import build_mixture, load_source_counted

    examples, _ = load_source_counted(spec, 0, ["calculator"])
    assert len(build_mixture([spec], 0, ["calculator"]).examples) == len(examples)
    return examples


def test_unknown_tool_is_a_config_error(tmp_path):
    from helpers import make_config

    from integration_training.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.tools: unknown tool 'python'"):
        make_config(tmp_path, data={"tools": ["python"]})
    with pytest.raises(ConfigError, match=r"data\.tools"):
        make_config(tmp_path, data={"tools": ["calculator", "calculator"]})
    assert make_config(tmp_path, data={"tools": ["calculator"]}).data.tools == ["calculator"]


def test_deploy_unknown_tool_exits_2_and_calculator_dry_run_plans(tmp_path):
    from test_cli import assert_one_line_user_error, config_text, deploy

    bad = tmp_path / "bad_tool.py"
    bad.write_text(config_text(**{'tools=["calculator"]': 'tools=["python"]'}))
    result = deploy(str(bad), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "data.tools" in result.stderr
    off = tmp_path / "no_tools.py"  # the shipped default has the calculator on; [] plans without it
    off.write_text(config_text(**{'tools=["calculator"]': "tools=[]"}))
    result = deploy(str(off), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "tools=[]" in result.stdout  # the shipped default's own dry-run (tools=['calculator']): test_cli
    del assert_one_line_user_error


def test_eval_cli_unknown_tool_exits_2():
    from integration_training.evaluate import main

    assert main(["--model", "unused", "--dataset", "arithmetic", "--split", "test", "--tools", "abacus"]) == 2


def test_sft_rl_and_eval_run_with_the_calculator(tmp_path):
    """The whole path with tools on: GSM8K-schema rows keep their calls, SFT masks forced spans, RL samples with the
    engine and trains, and the eval records list each completion's tool calls and say the report had tools on."""
    from helpers import make_config

    from integration_training import cli
    from integration_training.report import build_report

    spec = _gsm8k_spec(_tool_rows_file(tmp_path))
    config = make_config(
        tmp_path,
        data={"sft_mixture": [spec], "sft_val_mixture": [spec], "rl_mixture": [spec], "tools": ["calculator"]},
        rl={"sampling": {"max_new_tokens": 24}}, evaluation={"mixture": [spec], "sampling": {"max_new_tokens": 24}},
        output={"mode": "sft+rl"},
    )
    run_dir = cli.prepare_run_dir(config, resume=False, is_main=True)
    cli.dispatch(config, run_dir, resume=False)
    records = [json.loads(line) for f in sorted((run_dir / "eval").glob("*.jsonl")) for line in f.open()]
    assert records and all(isinstance(r["tool_calls"], list) and isinstance(r["greedy_tool_calls"], list)
                           for r in records)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    rl_steps = [m for m in metrics if m.get("stage") == "rl" and "reward" in m]
    assert rl_steps and all("forced_tokens" in m and "tool_calls" in m for m in rl_steps)
    assert "tools: calculator" in build_report(run_dir)[0]


# ---------------------------------------------------------------------------------------------------- word_problems


def _word_spec(split, n):
    from integration_training.config import DatasetSpec

    return DatasetSpec(name="word_problems", split=split, subset=None, max_samples=n, repeat=1, path=None, reward=None)


@pytest.mark.parametrize("seed", [0, 7, 1234])
def test_word_problems_are_exact_multistep_and_split_disjoint(seed):
    from integration_training.data import load_source_counted
    from integration_training.rewards import resolve_reward
    from integration_training.tools import ANNOTATION, calculate

    train, _ = load_source_counted(_word_spec("train", 400), seed, ["calculator"])
    test, _ = load_source_counted(_word_spec("test", 200), seed, ["calculator"])
    assert len(train) == 400 and len(test) == 200
    key = lambda e: tuple(int(n) for n in re.findall(r"\d+", e.messages[1]["content"]))  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in test}, "a worked solution appears in both splits"
    assert len({e.messages[0]["content"] for e in train}) == len(train)
    verifier = resolve_reward("arithmetic")
    operations = set()
    for e in train + test:
        answer = e.messages[1]["content"]
        calls = ANNOTATION.findall(answer)
        assert 3 <= len(calls) <= 4, answer
        for expression, result in calls:
            assert calculate(expression) == result and 0 <= int(result) <= 999  # exact integer steps, ≤ 3 digits
            operations |= set(re.findall(r"[-+*/]", expression))
        assert calls[-1][1] == e.reference and verifier.strict(answer, e.reference) == 1.0
        operands = {n for expression, _ in calls for n in re.findall(r"\d+", expression)}
        assert set(re.findall(r"\d+", e.messages[0]["content"])) - operands, "at least one distractor number"
    assert operations == {"+", "-", "*", "/"}


def test_word_problems_without_the_calculator_write_the_results_themselves():
    from integration_training.data import load_source

    on = load_source_counted_with_tools(_word_spec("train", 50))
    off = load_source(_word_spec("train", 50), 0)
    assert [e.messages[0] for e in on] == [e.messages[0] for e in off]
    for e_on, e_off in zip(on, off, strict=True):
        assert "<<" not in e_off.messages[1]["content"]
        assert e_off.messages[1]["content"] == e_on.messages[1]["content"].replace("<<", "").replace(">>", "")


def test_prepared_sft_data_renders_with_the_tools(tmp_path):
    """The SFT stream's tokenised cache renders with data.tools (forced spans mask 0) and keys on it."""
    from helpers import smollm2_tokenizer

    from integration_training import template
    from integration_training.data.prepared import prepare

    tokenizer = smollm2_tokenizer()
    examples = load_source_counted_with_tools(_gsm8k_spec(_tool_rows_file(tmp_path)))
    with_tools = prepare(tokenizer, examples, 256, tmp_path, ["calculator"])
    expected, _ = template.render_examples(tokenizer, examples, 256, ["calculator"])
    assert [with_tools[i] for i in range(len(with_tools))] == expected
    plain = prepare(tokenizer, examples, 256, tmp_path)
    assert plain.key != with_tools.key
    assert sum(sum(plain[i].loss_mask) for i in range(len(plain))) > sum(sum(r.loss_mask) for r in expected)
