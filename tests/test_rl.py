"""RL stage: advantages and loss against hand computation, the SFT→RL hand-off, learning signal, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from helpers import optimization, optimizer_config, replace_nested, smollm2_tokenizer  # also pins torch to one thread
from integration_training import rl
from integration_training.models import enable_activation_checkpointing
from integration_training.config import (
    Config,
    DataConfig,
    EvalConfig,
    DatasetSpec,
    ModelConfig,
    OutputConfig,
    RLConfig,
    SamplingConfig,
    SFTConfig,
    TargetConfig,
    validate,
)
from integration_training.distributed import Dist
from integration_training.errors import UserError
from integration_training.metrics import read_metrics

TARGET_DIGIT = "7"
PROMPT = "Pick a digit."
CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
F32 = ModelConfig(name="unused", dtype="float32", compile=False, attn_implementation="sdpa", gradient_checkpointing=False,
                  lora=None)


# ---------------------------------------------------------------------------------------------------- reward used
# by the learning-signal test through the "module:function" path


def starts_with_reference(completion: str, reference: str) -> float:
    return 1.0 if completion.strip().startswith(reference) else 0.0


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return smollm2_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=None,
        bos_token_id=None, eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).float()


@pytest.fixture(scope="module")
def digit_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random model whose next token after PROMPT is (almost only) one of the ten digits, ~10% each.

    The LM head rows of the digits point along the prompt's final hidden state and all other rows are zero, so
    the reward "answer starts with 7" starts near 0.1 and a working policy gradient must concentrate on one row.
    """
    from integration_training.template import render_prompt

    model = tiny_llama(len(tokenizer))
    prompt = render_prompt(tokenizer, [{"role": "user", "content": PROMPT}])
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        head = torch.zeros_like(model.lm_head.weight)
        digits = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
        assert all(len(d) == 1 for d in digits)
        for (token,) in digits:
            head[token] = 14.0 * hidden / hidden.norm() ** 2  # logit 14 ≫ log(vocab) for each digit
        model.lm_head.weight.copy_(head)
    out = tmp_path_factory.mktemp("digit_model")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def write_digit_data(directory: Path, count: int) -> Path:
    path = directory / "digits.jsonl"
    line = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": TARGET_DIGIT}],
            "reference": TARGET_DIGIT}
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(count)))
    return path


def make_config(tmp: Path, model_dir: Path, data: Path, rl: dict[str, Any] | None = None,
                evaluation: dict[str, Any] | None = None) -> Config:
    """Mode "rl" on `data` from `model_dir`; `rl` / `evaluation` override fields of those sections (nested dicts for
    nested sections). The evaluation samples like the rollouts unless `evaluation` says otherwise."""
    spec = DatasetSpec(name="custom_json", split="train", subset=None, max_samples=None, repeat=1, path=str(data),
                       reward=f"{__name__}:starts_with_reference")
    rl_section = replace_nested(RLConfig(
        num_epochs=1, num_iterations=4, examples_per_step=4, num_samples=8, batch_size=16,
        sampling=SamplingConfig(max_new_tokens=2, temperature=1.0, top_k=0, batch_size=32),
        optimizer=optimizer_config(lr=3e-3), advantage="mean", kl_coef=0.0, clip_eps=0.2, updates_per_batch=1,
        checkpoint_every=1000, log_every=1,
    ), rl or {})
    eval_section = replace_nested(EvalConfig(
        mixture=[spec], num_problems=4, num_samples=2, sampling=rl_section.sampling, at_start=True, after_sft=False,
        after_rl=True, every_rl_steps=0,
    ), evaluation or {})
    config = Config(
        target=TargetConfig(gpu_ranks=[], device_type="cpu", processes_per_node=1, parallelism="none", num_nodes=1,
                            node_rank=0, master_addr="127.0.0.1", master_port=29500),
        model=ModelConfig(name=str(model_dir), dtype="float32", compile=False, attn_implementation="sdpa",
                          gradient_checkpointing=False, lora=None),
        data=DataConfig(sft_mixture=[spec], sft_val_mixture=[spec], rl_mixture=[spec], max_length=128, shuffle_seed=7,
                        tools=[]),
        sft=SFTConfig(num_epochs=1, num_iterations=1, batch_size=1, examples_per_step=1,
                      optimizer=optimizer_config(lr=1e-4), packing=False, eval_every=1, eval_steps=1,
                      checkpoint_every=1, log_every=1),
        rl=rl_section,
        evaluation=eval_section,
        output=OutputConfig(save_dir=tmp, log_level="INFO", experiment_name="rl_test", use_wandb=False,
                            wandb_project="x", mode="rl", source_checkpoint=str(model_dir)),
    )
    validate(config)
    return config


# ---------------------------------------------------------------------------------------------------- advantages


def test_mean_advantage_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = rl.group_advantages(rewards, "mean")
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]])
    torch.testing.assert_close(adv, expected)
    assert bool((adv[1] == 0).all())  # uniform group: exactly zero


def test_mean_std_advantage_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    adv = rl.group_advantages(rewards, "mean_std", eps=1e-6)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) / torch.tensor([[std + 1e-6], [1e-6]])
    torch.testing.assert_close(adv, expected)
    assert bool((adv[1] == 0).all())


# ---------------------------------------------------------------------------------------------------- loss


def test_reinforce_loss_token_normalisation_by_hand() -> None:
    logprobs = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([0.5, 0.5, -1.0])
    loss, parts = rl.policy_loss(rl.PolicyLossInputs(logprobs=logprobs, old_logprobs=logprobs.detach(), advantages=adv),
                                 normaliser=10.0, kl_coef=0.0, clip_eps=0.2,
                                 use_ratio=False)
    assert loss.item() == pytest.approx(-(-1.0 * 0.5 + -2.0 * 0.5 + -0.5 * -1.0) / 10.0)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv / 10.0)
    assert parts["kl_sum"].item() == 0.0 and parts["clip_count"].item() == 0.0


def test_k3_kl_penalty_by_hand() -> None:
    logprobs = torch.tensor([-1.0, -3.0], requires_grad=True)
    ref = torch.tensor([-2.0, -3.0])
    adv = torch.zeros(2)
    loss, parts = rl.policy_loss(rl.PolicyLossInputs(logprobs=logprobs, old_logprobs=logprobs.detach(), advantages=adv,
                                                     ref_logprobs=ref), normaliser=4.0, kl_coef=0.5, clip_eps=0.2,
                                 use_ratio=False)
    kl0 = math.exp(-1.0) + 1.0 - 1.0  # exp(ref−logp) − (ref−logp) − 1 with ref−logp = −1
    assert parts["kl_sum"].item() == pytest.approx(kl0)
    assert loss.item() == pytest.approx(0.5 * kl0 / 4.0)
    loss.backward()
    # d/dlogp [exp(r − l) − (r − l) − 1] = −exp(r − l) + 1
    expected = torch.tensor([0.5 * (1.0 - math.exp(-1.0)) / 4.0, 0.0])
    torch.testing.assert_close(logprobs.grad, expected)


def test_ppo_clipping_by_hand() -> None:
    old = torch.zeros(4)
    logprobs = torch.tensor([0.5, 0.5, math.log(0.5), math.log(1.1)], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, parts = rl.policy_loss(rl.PolicyLossInputs(logprobs=logprobs, old_logprobs=old, advantages=adv), normaliser=4.0, kl_coef=0.0, clip_eps=0.2, use_ratio=True)
    r = math.exp(0.5)
    # token 0: ratio 1.65 > 1.2 with A>0 → clipped (1.2, no gradient); token 1: A<0 → min picks −1.65 (gradient);
    # token 2: ratio 0.5 with A>0 → min is the unclipped 0.5; token 3: inside the band.
    objective = [1.2, -r, 0.5, 1.1]
    assert loss.item() == pytest.approx(-sum(objective) / 4.0)
    assert parts["clip_count"].item() == 1.0
    loss.backward()
    expected = torch.tensor([0.0, r, -0.5, -1.1]) / 4.0  # −d(ratio·A)/dlogp = −ratio·A
    torch.testing.assert_close(logprobs.grad, expected)


def _rows(tokenizer, rewards: list[list[float]], seed: int = 0) -> list[rl.Sequence_]:
    """Rows with varied prompt and completion lengths and real sampler log-probs of a tiny model."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[1, 5, 9, 13, 17][: 2 + p] for p in range(len(rewards))]
    adv = rl.group_advantages(torch.tensor(rewards), "mean")
    rows = []
    for p, group in enumerate(rewards):
        for s, reward in enumerate(group):
            length = 1 + int(torch.randint(0, 4, (1,), generator=gen))
            completion = torch.randint(20, 90, (length,), generator=gen).tolist()
            rows.append(rl.Sequence_(prompts[p], completion, [-1.0] * length, float(adv[p, s]), reward))
    return rows


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


class _Capture:
    """An optimizer stand-in that records the gradients it was asked to apply."""

    def __init__(self, model) -> None:
        self.model, self.grads = model, None
        self.param_groups = [{"params": list(model.parameters())}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.grads = _grads(self.model)


def _rl_cfg(**overrides: Any) -> RLConfig:
    """An RLConfig for unit tests of the update (no clipping); `overrides` may hold nested dicts."""
    return replace_nested(RLConfig(
        num_epochs=1, num_iterations=1, examples_per_step=2, num_samples=3, batch_size=6,
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, top_k=0, batch_size=6),
        optimizer=optimizer_config(lr=1e-3, grad_clip=0.0), advantage="mean", kl_coef=0.0, clip_eps=0.2,
        updates_per_batch=1, checkpoint_every=1, log_every=1,
    ), overrides)


def test_token_level_normalisation_across_micro_batches() -> None:
    model = tiny_llama(96)
    rows = _rows(None, [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    grads = {}
    for micro in (1, 2, 6):
        capture = _Capture(model)
        rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(capture), rows, rl=_rl_cfg(batch_size=micro), pad_id=0)
        grads[micro] = capture.grads
    # By hand: one batch, −Σ_all tokens logp·adv / total tokens.
    model.zero_grad()
    batch = rl.build_batch(rows, 0, torch.device("cpu"))
    logprobs, _ = rl.completion_logprobs(model, batch, False, "float32")
    (-(logprobs * batch.advantages).sum() / batch.num_tokens).backward()
    by_hand = _grads(model)
    for micro, got in grads.items():
        for name in by_hand:
            torch.testing.assert_close(got[name], by_hand[name], rtol=1e-4, atol=1e-7, msg=f"micro={micro} {name}")


def test_zero_advantage_rows_are_skipped_with_the_same_gradient(monkeypatch) -> None:
    model = tiny_llama(96)
    rows = _rows(None, [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # two uniform groups: 6 rows of 9
    built: list[int] = []
    real_build = rl.build_batch
    monkeypatch.setattr(rl, "build_batch", lambda r, *a: built.append(len(r)) or real_build(r, *a))
    capture = _Capture(model)
    stats = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(capture), rows, rl=_rl_cfg(batch_size=9), pad_id=0)
    assert built == [3] and stats["skipped_frac"] == pytest.approx(6 / 9)
    # By hand over all 9 rows: the skipped rows' tokens still count in the token-level mean.
    model.zero_grad()
    batch = real_build(rows, 0, torch.device("cpu"))
    logprobs, _ = rl.completion_logprobs(model, batch, False, "float32")
    (-(logprobs * batch.advantages).sum() / batch.num_tokens).backward()
    by_hand = _grads(model)
    for name in by_hand:
        torch.testing.assert_close(capture.grads[name], by_hand[name], rtol=1e-4, atol=1e-7, msg=name)
    # With a reference model (KL term) nothing may be skipped.
    built.clear()
    rl.train_on_rows(rl.PolicyModels.of(model, tiny_llama(96, seed=1), F32), optimization(_Capture(model)), rows,
                     rl=_rl_cfg(batch_size=9, kl_coef=0.1), pad_id=0)
    assert built == [9]


def test_completion_logprobs_match_full_forward() -> None:
    model = tiny_llama(96).eval()
    rows = _rows(None, [[1.0, 0.0, 1.0]])
    batch = rl.build_batch(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        flat, entropy = rl.completion_logprobs(model, batch, False, "float32", with_entropy=True)
        expected = []
        for r in rows:  # each prompt+completion scored alone, in full: what the grouped layout must reproduce
            full = torch.log_softmax(model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids])).logits[0], -1)
            p = len(r.prompt_ids)
            expected += [full[p - 1 + i, t].item() for i, t in enumerate(r.completion_ids)]
    torch.testing.assert_close(flat, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert entropy is not None and bool((entropy > 0).all())


def test_uniform_reward_groups_give_exactly_zero_gradient() -> None:
    model = tiny_llama(96)
    rows = _rows(None, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert all(r.advantage == 0.0 for r in rows)
    for cfg in (_rl_cfg(), _rl_cfg(advantage="mean_std"), _rl_cfg(updates_per_batch=2)):
        capture = _Capture(model)
        rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(capture), rows, rl=cfg, pad_id=0)
        assert all(bool((g == 0).all()) for g in capture.grads.values())


def test_kl_penalty_gradient_when_policy_differs_from_reference() -> None:
    model, ref = tiny_llama(96, seed=0), tiny_llama(96, seed=1)
    rows = _rows(None, [[1.0, 1.0, 1.0]])  # no policy-gradient signal: only KL moves the weights
    capture = _Capture(model)
    stats = rl.train_on_rows(rl.PolicyModels.of(model, ref, F32), optimization(capture), rows, rl=_rl_cfg(kl_coef=0.1), pad_id=0)
    assert stats["kl"] > 0
    assert any(bool((g != 0).any()) for g in capture.grads.values())
    same = _Capture(model)
    stats_same = rl.train_on_rows(rl.PolicyModels.of(model, model, F32), optimization(same), rows, rl=_rl_cfg(kl_coef=0.1), pad_id=0)
    assert stats_same["kl"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- schedule


def test_total_steps_and_prompt_order() -> None:
    assert rl.total_steps(_rl_cfg(num_iterations=-1, num_epochs=2, examples_per_step=4), 10) == 5
    assert rl.total_steps(_rl_cfg(num_iterations=3), 10) == 3
    with pytest.raises(UserError, match="num_iterations"):
        rl.total_steps(_rl_cfg(num_iterations=-1, examples_per_step=4), 3)
    first_epoch = [i for s in range(3) for i in rl.step_prompt_indices(s, 2, 6, seed=0)]
    assert first_epoch == list(range(6))
    second_epoch = [i for s in range(3, 6) for i in rl.step_prompt_indices(s, 2, 6, seed=0)]
    assert sorted(second_epoch) == list(range(6))


# ---------------------------------------------------------------------------------------------------- stage runs


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_handoff_loads_exact_sft_weights(digit_model_dir: Path) -> None:
    model, tokenizer = rl.load_policy(digit_model_dir, ModelConfig(
        name="unused", dtype="float32", compile=False, attn_implementation="sdpa", gradient_checkpointing=False,
        lora=None), torch.device("cpu"), training=True)
    saved = _weights(digit_model_dir)
    state = model.state_dict()
    assert set(saved) <= set(state)
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert tokenizer.pad_token_id is not None


def test_missing_init_model_is_user_error_naming_path(tmp_path: Path) -> None:
    cfg = ModelConfig(name="x", dtype="float32", compile=False, attn_implementation="sdpa",
                      gradient_checkpointing=False, lora=None)
    missing = tmp_path / "nope" / "step_000010"
    with pytest.raises(UserError, match="step_000010"):
        rl.load_policy(missing, cfg, torch.device("cpu"), training=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        rl.load_policy(tmp_path / "empty", cfg, torch.device("cpu"), training=True)


def test_learning_signal_reward_rises(tmp_path: Path, digit_model_dir: Path) -> None:
    data = write_digit_data(tmp_path, 64)
    config = make_config(tmp_path, digit_model_dir, data, rl=dict(num_iterations=16, sampling=dict(max_new_tokens=1),
                                                                  optimizer=optimizer_config(lr=1e-2)))
    from integration_training import evaluate

    run = tmp_path / "run"
    baseline = evaluate.run(config, run, "baseline", 0, source=digit_model_dir)  # what deploy.py runs first
    final = rl.run_rl(config, run, digit_model_dir, resume=False)
    end = evaluate.run(config, run, "rl", 16, source=final)  # and after RL
    rows = read_metrics(run, "rl")
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert rewards[0] < 0.2, rewards
    assert max(rewards[-3:]) > 0.8 and rewards[-1] > 0.8, rewards
    assert end["eval/pass@1_strict"] > baseline["eval/pass@1_strict"]
    assert {"loss", "kl", "entropy", "response_tokens", "tokens_per_s", "gen_seconds", "train_seconds"} <= set(rows[-1])
    assert final.name == "step_000016" and (run / "eval" / "rl_step_000016.jsonl").is_file()


def test_resume_is_bitwise_and_metrics_have_no_gaps(tmp_path: Path, digit_model_dir: Path, monkeypatch) -> None:
    data = write_digit_data(tmp_path, 64)
    kwargs = dict(rl=dict(num_iterations=4, checkpoint_every=2, updates_per_batch=2, kl_coef=0.05,
                          advantage="mean_std"), evaluation=dict(every_rl_steps=2))
    straight = make_config(tmp_path / "a", digit_model_dir, data, **kwargs)
    final_a = rl.run_rl(straight, tmp_path / "a" / "run", digit_model_dir, resume=False)

    # Interrupted run: a stop request after step 2 (what SIGTERM does), then --resume.
    broken = make_config(tmp_path / "b", digit_model_dir, data, **kwargs)
    run_b = tmp_path / "b" / "run"
    real_one_step = rl._one_step

    def one_step_then_stop(*args, **kw):
        values = real_one_step(*args, **kw)
        if kw["step"] == 1:  # the 0-based step index: stop after step 2 has been trained
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        return values

    monkeypatch.setattr(rl, "_one_step", one_step_then_stop)
    stopped = rl.run_rl(broken, run_b, digit_model_dir, resume=False)
    assert stopped.name == "step_000002"
    # Simulate a crash after step 3's metrics line was written but before its checkpoint: resume must drop it.
    with open(run_b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": "rl", "step": 3, "reward": -1}) + "\n")
    monkeypatch.setattr(rl, "_one_step", real_one_step)
    with pytest.raises(UserError, match="--resume"):
        rl.run_rl(broken, run_b, digit_model_dir, resume=False)
    final_b = rl.run_rl(broken, run_b, digit_model_dir, resume=True)

    a, b = _weights(final_a), _weights(final_b)
    assert all(torch.equal(a[n], b[n]) for n in a)
    steps_a = [r["step"] for r in read_metrics(tmp_path / "a" / "run", "rl")]
    steps_b = [r["step"] for r in read_metrics(run_b, "rl")]
    assert steps_a == steps_b == [1, 2, 3, 4]
    timing = {"gen_seconds", "train_seconds", "tokens_per_s"}

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert strip(read_metrics(tmp_path / "a" / "run", "rl")) == strip(read_metrics(run_b, "rl"))


def test_grouped_scoring_matches_full_rows_in_values_and_gradients() -> None:
    """The shared prompt runs once per group; the loss and every gradient equal scoring each row in full."""
    model = tiny_llama(96)
    rows = _rows(None, [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    batch = rl.build_batch(rows, 0, torch.device("cpu"))
    assert batch.prompt_ids.shape[0] == 3 and batch.row_prompt.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    logprobs, _ = rl.completion_logprobs(model, batch, False, "float32")
    (logprobs * batch.advantages).sum().backward()
    grouped = _grads(model)
    model.zero_grad()
    total = torch.zeros(())
    for r in rows:
        logits = model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids])).logits[0]
        p = len(r.prompt_ids)
        picked = torch.log_softmax(logits[p - 1 : p - 1 + len(r.completion_ids)], -1)
        total = total + (picked.gather(1, torch.tensor(r.completion_ids)[:, None]).sum() * r.advantage)
    total.backward()
    full = _grads(model)
    for name in full:
        torch.testing.assert_close(grouped[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sample_batch_size_sets_the_sampling_chunks_of_rollouts_and_evaluation(tmp_path: Path, digit_model_dir: Path,
                                                                               monkeypatch) -> None:
    from integration_training import rollout

    chunks: list[int] = []
    real = rollout._sample_chunk

    def spy(model, context, **kwargs):
        chunks.append(len(kwargs["row_prompt"]))
        return real(model, context, **kwargs)

    monkeypatch.setattr(rollout, "_sample_chunk", spy)
    data = write_digit_data(tmp_path, 8)
    # 4 prompts × 8 samples = 32 rollout rows per step in chunks of 12; eval: 4 problems × (2 samples + greedy).
    # RL evaluates its policy itself after every step (every_rl_steps=1; after_rl off: no CLI evaluation to leave
    # the last step to).
    config = make_config(tmp_path, digit_model_dir, data, rl=dict(num_iterations=1, sampling=dict(batch_size=12,
                                                                                                  max_new_tokens=1)),
                         evaluation=dict(every_rl_steps=1, after_rl=False))
    rl.run_rl(config, tmp_path / "run", digit_model_dir, resume=False)
    assert chunks == [12, 12, 8] + [12], chunks  # the step's rollouts, the evaluation after it


def test_a_rank_with_fewer_batches_pads_to_the_busiest_rank_with_zero_loss(monkeypatch) -> None:
    """Another rank needing 3 micro-batches (simulated through all_reduce_max): this rank runs 3 as well."""
    from integration_training import distributed

    model = tiny_llama(96)
    rows = _rows(None, [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # 3 rows to train, 3 skipped
    alone = _Capture(model)
    stats_alone = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(alone), rows, rl=_rl_cfg(batch_size=3), pad_id=0)
    sizes: list[int] = []
    real_build = rl.build_batch
    monkeypatch.setattr(rl, "build_batch", lambda r, *a: sizes.append(len(r)) or real_build(r, *a))
    monkeypatch.setattr(distributed, "all_reduce_max", lambda tensor, dist: tensor.fill_(3.0))
    padded = _Capture(model)
    stats = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(padded), rows, rl=_rl_cfg(batch_size=3), pad_id=0)
    assert sizes == [3, 1, 1]  # the real micro-batch, then two one-row zero-advantage pads
    for name in alone.grads:
        torch.testing.assert_close(padded.grads[name], alone.grads[name], rtol=1e-5, atol=1e-8, msg=name)
    assert stats["entropy"] == pytest.approx(stats_alone["entropy"])
    assert stats["loss"] == pytest.approx(stats_alone["loss"])


# ---------------------------------------------------------------------------------------------------- GPU-grade details


def _full_row_reference(model, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ adv·logp over every completion token, each row scored alone in one plain forward; + the flat log-probs."""
    total, flat = torch.zeros(()), []
    for r in rows:
        logits = model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids]), use_cache=False).logits[0]
        p = len(r.prompt_ids)
        picked = torch.log_softmax(logits[p - 1 : p - 1 + len(r.completion_ids)], -1)
        logp = picked.gather(1, torch.tensor(r.completion_ids)[:, None]).squeeze(1)
        flat.append(logp)
        total = total + logp.sum() * r.advantage
    return total, torch.cat(flat)


def test_gradient_checkpointing_scores_exactly_with_full_rows_in_train_mode() -> None:
    """Under gradient checkpointing (train mode) HF layers drop past_key_values: the full-row layout stays exact."""
    rows = _rows(None, [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]], seed=3)
    batch = rl.build_batch(rows, 0, torch.device("cpu"))
    plain = tiny_llama(96).train()
    total, expected = _full_row_reference(plain, rows)
    total.backward()
    reference = _grads(plain)

    model = tiny_llama(96)
    enable_activation_checkpointing(model)
    model.train()
    logprobs, _ = rl.completion_logprobs(model, batch, True, "float32")
    torch.testing.assert_close(logprobs, expected.detach(), rtol=1e-5, atol=1e-5)
    (logprobs * batch.advantages).sum().backward()
    got = _grads(model)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    # The shared-prompt layout is what checkpointing breaks (transformers 5.23 drops the prompt's cache: no cache
    # comes back, or completions scored without their prompt): the reason for the full-row layout. If an upgrade
    # ever keeps the cache, this fails and documents that it changed.
    try:
        with torch.no_grad():
            shared, _ = rl.completion_logprobs(model, batch, False, "float32")
        broken = bool((shared - expected.detach()).abs().max() > 1e-3)
    except AttributeError:  # past_key_values is None
        broken = True
    assert broken


def test_rl_trains_in_train_mode_with_checkpointing_through_run_rl(tmp_path: Path, digit_model_dir: Path,
                                                                   monkeypatch) -> None:
    import dataclasses

    seen = []
    real = rl.completion_logprobs

    def spy(model, batch, full_rows, dtype, with_entropy=False):
        seen.append((model.training, full_rows))
        return real(model, batch, full_rows, dtype, with_entropy=with_entropy)

    monkeypatch.setattr(rl, "completion_logprobs", spy)
    data = write_digit_data(tmp_path, 16)
    config = make_config(tmp_path, digit_model_dir, data, rl=dict(num_iterations=1))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=True))
    rl.run_rl(config, tmp_path / "run", digit_model_dir, resume=False)
    assert seen and all(training and full for training, full in seen)


def test_ppo_ratio_starts_at_one_with_the_trainers_old_logprobs() -> None:
    """updates_per_batch=2 with lr 0: the ratio is exactly 1 on both updates, so nothing clips — although the
    sampler's log-probs (here deliberately off by 0.5) would have clipped every token; the gap is logged."""
    model = tiny_llama(96)
    rows = _rows(None, [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], seed=4)
    with torch.no_grad():
        _, true_logp = _full_row_reference(model, rows)
    offset, shifted = 0, []
    for r in rows:
        n = len(r.completion_ids)
        shifted.append(dataclasses_replace(r, old_logprobs=(true_logp[offset : offset + n] + 0.5).tolist()))
        offset += n
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = 0.0
    stats = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(optimizer), shifted,
                             rl=_rl_cfg(updates_per_batch=2, batch_size=2), pad_id=0)
    assert stats["clip_frac"] == 0.0
    assert stats["logprob_mismatch"] == pytest.approx(0.5, abs=1e-4)
    # The planted fault this guards against: the sampler's log-probs as the denominator clip where adv·ratio grows.
    ratio = torch.exp(torch.tensor([-0.5]))
    assert float(ratio) < 1 - 0.2


def dataclasses_replace(row, **changes):
    import dataclasses

    return dataclasses.replace(row, **changes)


def test_non_finite_rl_update_is_not_applied_and_resume_continues(tmp_path: Path, digit_model_dir: Path,
                                                                   monkeypatch) -> None:
    """A NaN loss at step 2: no update applied, no checkpoint written for it, TrainingDiverged naming step 2 and the
    last good checkpoint; after the fault is gone, --resume continues from step 1 to the end."""
    from integration_training.errors import TrainingDiverged

    data = write_digit_data(tmp_path, 32)
    config = make_config(tmp_path, digit_model_dir, data, rl=dict(num_iterations=3, checkpoint_every=1))
    real = rl.completion_logprobs

    def poisoned(model, batch, full_rows, dtype, with_entropy=False):
        logprobs, entropy = real(model, batch, full_rows, dtype, with_entropy=with_entropy)
        return logprobs * float("nan"), entropy

    real_one_step = rl._one_step

    def one_step(*args, **kwargs):
        if kwargs["step"] == 1:  # the 0-based step index: poison step 2
            monkeypatch.setattr(rl, "completion_logprobs", poisoned)
        return real_one_step(*args, **kwargs)

    monkeypatch.setattr(rl, "_one_step", one_step)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 2") as info:
        rl.run_rl(config, run, digit_model_dir, resume=False)
    assert info.value.last_checkpoint.name == "step_000001"
    assert sorted(p.name for p in (run / "checkpoints" / "rl").iterdir()) == ["step_000001"]
    assert all(torch.isfinite(t).all() for t in _weights(run / "checkpoints" / "rl" / "step_000001").values())
    monkeypatch.setattr(rl, "completion_logprobs", real)
    monkeypatch.setattr(rl, "_one_step", real_one_step)
    final = rl.run_rl(config, run, digit_model_dir, resume=True)
    assert final.name == "step_000003"
