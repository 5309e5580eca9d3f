"""LoRA (model.lora): config checks, target matching, training only the adapters, the adapter-off reference model,
sampling equal to the merged model, checkpoints (adapter + merged export), exact resume, SFT→RL hand-off and
DDP/FSDP2 equal to one process — at unit level and through deploy.py.

Run as a script (`torchrun --nproc_per_node=2 tests/test_lora.py OUT_DIR PARALLELISM`) this file is also the worker
of the RL equivalence test: each rank trains one LoRA RL step (with a KL term) on fixed rows and rank 0 saves the
adapter tensors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import arithmetic, make_config, optimization, replace_nested, save_tiny_model_dir, tiny_model
from integration_training import lora, optim, rl, sft
from integration_training.config import ConfigError, LoRAConfig, ModelConfig, from_json, to_json, validate
from integration_training.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


def lora_config(target_modules=("all-linear",), r: int = 4, alpha: float = 8.0, dropout: float = 0.0) -> LoRAConfig:
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=list(target_modules))


def model_config(lora_cfg: LoRAConfig | None, gradient_checkpointing: bool = False) -> ModelConfig:
    return ModelConfig(name="unused", dtype="float32", compile=False, attn_implementation="sdpa",
                       gradient_checkpointing=gradient_checkpointing, lora=lora_cfg)


def adapted(seed: int = 0, targets=("all-linear",), perturb: bool = True) -> lora.Adapters:
    """A tiny model with adapters; `perturb` moves B off zero so the adapters change the output."""
    adapters = lora.prepare(tiny_model(VOCAB, seed), model_config(lora_config(targets)), None, seed)
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in adapters.trainable():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return adapters


def lora_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors), cloned."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ({k: v for k, v in state.items() if not lora.is_adapter_key(k)},
            {k: v for k, v in state.items() if lora.is_adapter_key(k)})


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(r=0), "model.lora.r: must be >= 1"),
        (dict(r=-3), "model.lora.r: must be >= 1"),
        (dict(alpha=0.0), "model.lora.alpha: must be > 0"),
        (dict(alpha=-1.0), "model.lora.alpha: must be > 0"),
        (dict(dropout=1.0), "model.lora.dropout: must be in [0, 1)"),
        (dict(dropout=-0.1), "model.lora.dropout: must be in [0, 1)"),
        (dict(target_modules=[]), "model.lora.target_modules: must name at least one"),
        (dict(target_modules=["all-linear", "q_proj"]), "already covers every linear layer"),
        (dict(target_modules=["q_proj", "q_proj"]), "lists a name twice"),
        (dict(target_modules=[""]), "model.lora.target_modules[0]"),
        (dict(target_modules=["q_proj", " v_proj"]), "model.lora.target_modules[1]"),
        (dict(target_modules=["q_proj."]), "model.lora.target_modules[0]"),
        (dict(r=2.5), "model.lora.r: expected an integer"),
        (dict(r=True), "model.lora.r: expected an integer"),
        (dict(alpha="16"), "model.lora.alpha: expected a number"),
        (dict(target_modules="all-linear"), "model.lora.target_modules: expected a list"),
        (dict(target_modules=["q_proj", 3]), "model.lora.target_modules[1]: expected a string"),
    ],
)
def test_bad_lora_fields_are_named(tmp_path, fields, fragment):
    config = make_config(tmp_path)
    bad = dataclasses.replace(config, model=dataclasses.replace(config.model, lora=dataclasses.replace(lora_config(), **fields)))
    with pytest.raises(ConfigError) as error:
        validate(bad)
    assert any(fragment in problem for problem in error.value.problems), error.value.problems


def test_lora_fields_have_no_defaults():
    with pytest.raises(ConfigError) as error:
        LoRAConfig(r=4)
    assert {"LoRAConfig.alpha: missing", "LoRAConfig.dropout: missing", "LoRAConfig.target_modules: missing"} <= {
        p.split(" (")[0] for p in error.value.problems}
    with pytest.raises(ConfigError, match="ModelConfig.lora: missing"):
        ModelConfig(name="x", dtype="float32", compile=False, attn_implementation="sdpa", gradient_checkpointing=False)


@pytest.mark.parametrize("mode, stage", [("sft", "sft"), ("sft+rl", "sft"), ("sft+rl", "rl"), ("rl", "rl")])
def test_muon_with_lora_is_refused_for_the_stages_that_run(tmp_path, mode, stage):
    output = dict(mode=mode, source_checkpoint=str(tmp_path) if mode == "rl" else None)
    config = make_config(tmp_path, model=dict(lora=lora_config()), output=output)
    bad = replace_nested(config, {stage: {"optimizer": {"name": "muon"}}})
    with pytest.raises(ConfigError) as error:
        validate(bad)
    assert any(p.startswith(f"{stage}.optimizer.name: 'muon' does not apply to LoRA") for p in error.value.problems)
    # The same optimizer without LoRA is a valid full fine-tune; a stage that does not run is not checked.
    validate(dataclasses.replace(bad, model=dataclasses.replace(bad.model, lora=None)))
    if mode == "sft":
        validate(replace_nested(config, {"rl": {"optimizer": {"name": "muon"}}}))


def test_lora_config_round_trips_through_json(tmp_path):
    config = make_config(tmp_path, model=dict(lora=lora_config(("q_proj", "v_proj"), r=8, alpha=16.0, dropout=0.1)))
    again = from_json(to_json(config))
    assert again == config and again.model.lora == config.model.lora
    assert from_json(to_json(make_config(tmp_path))).model.lora is None


# ---------------------------------------------------------------------------------------------------- targets


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("names", [["q_proj"], ["v_proj", "down_proj"], ["self_attn.o_proj"], list(LLAMA_LINEAR)])
def test_named_targets_adapt_exactly_the_matching_linear_layers(names):
    model = tiny_model(VOCAB, 0)
    targets = lora.resolve_targets(model, lora_config(names))
    expected = sorted(f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}."
                      f"{n.rsplit('.', 1)[-1]}" for i in range(2) for n in names)
    assert targets == expected
    adapters = lora.prepare(model, model_config(lora_config(names)), None, 0)
    assert sorted(adapters.scalings()) == expected


def test_all_linear_adapts_every_linear_layer_but_the_lm_head():
    model = tiny_model(VOCAB, 0)
    targets = lora.resolve_targets(model, lora_config())
    assert len(targets) == 2 * len(LLAMA_LINEAR) and not any("lm_head" in t for t in targets)


@pytest.mark.parametrize(
    "names, fragment",
    [
        (["q_proj", "qkv_proj"], "'qkv_proj' matches no module of LlamaForCausalLM"),
        (["attn"], "'attn' matches no module"),
        (["lm_head"], "'lm_head' is the output layer"),
        (["mlp"], "'mlp' matches model.layers.0.mlp, which is not a linear layer"),
        (["embed_tokens"], "which is not a linear layer"),
    ],
)
def test_targets_that_match_no_linear_layer_are_user_errors_naming_them(names, fragment):
    with pytest.raises(UserError, match="model.lora.target_modules") as error:
        lora.prepare(tiny_model(VOCAB, 0), model_config(lora_config(names)), None, 0)
    assert fragment in str(error.value)
    assert "q_proj" in str(error.value) or "output layer" in str(error.value)  # says what would match


# ---------------------------------------------------------------------------------------------------- training


def test_fresh_adapters_start_at_the_base_model_and_are_float32_even_on_a_bf16_base():
    base = tiny_model(VOCAB, 0)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    adapters = lora.prepare(tiny_model(VOCAB, 0), model_config(lora_config()), None, 0)
    with torch.no_grad():
        assert torch.equal(adapters.model(input_ids=ids).logits, expected)  # B = 0
    bf16 = lora.prepare(tiny_model(VOCAB, 0).to(torch.bfloat16), model_config(lora_config()), None, 0)
    assert {p.dtype for p in bf16.trainable()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        assert bf16.model(input_ids=ids).logits.dtype == torch.bfloat16  # runs with the mixed dtypes


def test_fresh_adapters_depend_on_the_seed_only_and_leave_the_global_rng_alone():
    def fresh(global_seed: int, seed: int) -> dict[str, torch.Tensor]:
        model = tiny_model(VOCAB, 0)  # (seeds the global RNG itself)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        adapters = lora.prepare(model, model_config(lora_config()), None, seed)
        assert torch.equal(torch.get_rng_state(), before)
        return lora_state(adapters.model)[1]

    first = fresh(123, 0)
    assert all(torch.equal(first[k], v) for k, v in fresh(999, 0).items())
    other = fresh(123, 1)
    assert all(not torch.equal(first[k], other[k]) for k in first if ".lora_A." in k)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "up_proj")])
def test_sft_steps_change_only_adapter_tensors(tmp_path, targets, gradient_checkpointing):
    """Through the SFT train step and optimizer: base tensors bitwise identical, every adapter tensor moved."""
    from integration_training.template import Batch
    from test_distributed import SINGLE

    model = tiny_model(VOCAB, 0)
    if gradient_checkpointing:
        # Reentrant: gradients reach the adapters only if the frozen embedding's output requires grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    adapters = lora.prepare(model, model_config(lora_config(targets), gradient_checkpointing), None, 0)
    base_before, adapter_before = lora_state(model)
    settings = dataclasses.replace(make_config(tmp_path).sft.optimizer, matrix_lr=1e-2, weight_decay=0.1)
    optimizer = optim.build_optimizer(model, settings)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in adapters.trainable()}  # the optimizer holds adapters only
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
        labels = torch.roll(ids, -1, dims=1)
        batch = Batch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                      position_ids=torch.arange(12).expand(2, 12))
        sft.train_step(sft.SupervisedTokenLoss(model, "float32", True), optimization(optimizer, 1.0), [batch],
                       tokens=24, lr_multiplier=1.0)
    base_after, adapter_after = lora_state(model)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert all(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_before)


# ---------------------------------------------------------------------------------------------------- reference


def test_reference_is_the_base_model_with_adapters_off_and_the_adapters_come_back():
    base = tiny_model(VOCAB, 0)
    adapters = adapted(0)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on_before = adapters.model(input_ids=ids).logits
        off = adapters.reference()(input_ids=ids).logits
        on_after = adapters.model(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.equal(off, plain)
    assert not torch.allclose(on_before, plain, atol=1e-3)
    assert torch.equal(on_before, on_after)
    assert all(p.requires_grad for p in adapters.trainable()) and adapters.trainable()


@pytest.mark.parametrize("with_lora, expected_loads", [(True, 1), (False, 2)])
def test_rl_with_lora_and_kl_loads_no_second_model(tmp_path, monkeypatch, with_lora, expected_loads):
    """The KL reference with LoRA is the policy itself (one model load); a full fine-tune loads a second copy.
    Peak RSS of both on SmolLM2-135M: benchmarks/bench_lora.py (numbers in BENCHMARKS.md)."""
    from integration_training import models

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    if with_lora:
        monkeypatch.setattr(rl, "load_reference", lambda *a, **k: pytest.fail("LoRA must not load a reference"))
    model_dir = save_tiny_model_dir(tmp_path / "tiny_model")
    config = make_config(tmp_path, model=dict(lora=lora_config() if with_lora else None),
                         rl=dict(kl_coef=0.5, num_iterations=1), evaluation=dict(num_problems=2),
                         output=dict(mode="rl", source_checkpoint=str(model_dir)))
    final = rl.run_rl(config, tmp_path / "run", str(model_dir), resume=False)
    assert len(loads) == expected_loads, loads
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["kl"] >= 0 for line in lines if "kl" in line] == [True]
    assert (final / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------- sampling


def lora_layers(model: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def sample_all(model, prompts, seed: int, temperature: float):
    from integration_training.rollout import SamplingSettings, SpecialTokens, sample

    return sample(model, prompts, num_samples=4,
                  settings=SamplingSettings(max_new_tokens=12, temperature=temperature, top_k=0, batch_size=6),
                  special=SpecialTokens(stop_ids=frozenset(), pad_id=0), generator=torch.Generator().manual_seed(seed),
                  greedy_first=True)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_merged_for_sampling_equals_the_merged_export_and_gives_the_base_back_bitwise(tmp_path, seed,
                                                                                                  temperature):
    """What RL samples with (adapters merged by peft around the call) = the unmerged model = the merged export; on
    leaving, every base weight is the same tensor, bit for bit, and the adapters are live again."""
    from transformers import AutoModelForCausalLM

    adapters = adapted(seed)
    model = adapters.model
    adapters.writer(final=True, dtype="float32").save_pretrained(str(tmp_path))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    prompts = [[int(t) for t in torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed + n))]
               for n in (3, 5, 8)]
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    base_before, adapter_before = lora_state(model)
    storage_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        live_before = model(input_ids=ids).logits

    unmerged = sample_all(model, prompts, seed, temperature)
    export = lora.merged_state(model.state_dict(), adapters.scalings())
    with lora.merged_for_sampling(model, sharded=False):
        assert all(layer.merged for layer in lora_layers(model)) and lora_layers(model)
        # The weights sampled with are the merged export's, bit for bit (same float32 arithmetic as the writer).
        live = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not lora.is_adapter_key(k)}
        assert_same(live, export)
        merged = sample_all(model, prompts, seed, temperature)
    assert not any(layer.merged for layer in lora_layers(model))
    reference = sample_all(exported, prompts, seed, temperature)

    for groups in (unmerged, reference):
        for a_group, b_group in zip(merged, groups, strict=True):
            for a, b in zip(a_group, b_group, strict=True):
                assert a.token_ids == b.token_ids
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    base_after, adapter_after = lora_state(model)
    assert_same(base_after, base_before)
    assert_same(adapter_after, adapter_before)
    assert all(p.data_ptr() == storage_before[name] for name, p in model.named_parameters())  # the same memory
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, live_before)  # adapters live again


def test_merged_for_sampling_on_a_bf16_base_matches_within_bf16_rounding_and_restores_bitwise():
    adapters = lora.prepare(tiny_model(VOCAB, 0).to(torch.bfloat16), model_config(lora_config()), None, 0)
    with torch.no_grad():
        for param in adapters.trainable():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    model = adapters.model
    base_before, _ = lora_state(model)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        with lora.merged_for_sampling(model, sharded=False):
            merged = model(input_ids=ids).logits.float()
    assert not torch.equal(merged, unmerged)  # the merge happened (bf16 rounds it differently)
    torch.testing.assert_close(merged, unmerged, atol=0.1, rtol=0.02)
    assert_same(lora_state(model)[0], base_before)


def test_merged_for_sampling_restores_the_base_when_sampling_fails_and_is_a_no_op_without_adapters_or_sharded():
    adapters = adapted(0)
    model = adapters.model
    base_before, _ = lora_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.merged_for_sampling(model, sharded=False):
            raise RuntimeError("boom")
    assert not any(layer.merged for layer in lora_layers(model))
    assert_same(lora_state(model)[0], base_before)
    with lora.merged_for_sampling(model, sharded=True):  # FSDP2 shards sample unmerged
        assert not any(layer.merged for layer in lora_layers(model))
    plain = tiny_model(VOCAB, 0)
    storage = [p.data_ptr() for p in plain.parameters()]
    with lora.merged_for_sampling(plain, sharded=False):
        pass
    assert [p.data_ptr() for p in plain.parameters()] == storage


def test_rl_rollouts_and_evaluations_sample_with_merged_adapters(tmp_path, monkeypatch):
    """Through run_rl: every sampling call (rollouts, evaluations during RL) sees the adapters merged, every
    training forward sees them live."""
    from integration_training import rollout

    seen = []
    real_sample = rollout.sample

    def spy(model, *args, **kwargs):
        layers = lora_layers(model)
        seen.append(bool(layers) and all(layer.merged for layer in layers))
        return real_sample(model, *args, **kwargs)

    monkeypatch.setattr(rollout, "sample", spy)
    real_train = rl.train_on_rows

    def train_spy(models, *args, **kwargs):
        policy = models.model
        assert lora_layers(policy) and not any(layer.merged for layer in lora_layers(policy))
        return real_train(models, *args, **kwargs)

    monkeypatch.setattr(rl, "train_on_rows", train_spy)
    model_dir = save_tiny_model_dir(tmp_path / "tiny_model")
    config = make_config(tmp_path, model=dict(lora=lora_config()), rl=dict(num_iterations=2),
                         evaluation=dict(num_problems=2, every_rl_steps=1),
                         output=dict(mode="rl", source_checkpoint=str(model_dir)))
    rl.run_rl(config, tmp_path / "run", str(model_dir), resume=False)
    assert len(seen) >= 3 and all(seen), seen  # 2 rollouts + the evaluations during RL


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_adapter_checkpoint_loads_with_peft_and_merged_logits_match_within_1e_5(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = adapted(3)
    adapters.writer(final=True, dtype="float32").save_pretrained(str(tmp_path / "final"))
    adapters.writer(final=False, dtype="float32").save_pretrained(str(tmp_path / "mid"))
    assert not (tmp_path / "mid" / "config.json").exists()  # intermediate steps hold the adapter only
    assert not (tmp_path / "final" / "adapter_config.json").exists()  # transformers must see a plain model
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        live = adapters.model(input_ids=ids).logits
        for step in ("final", "mid"):
            peft_model = PeftModel.from_pretrained(tiny_model(VOCAB, 3), str(lora.adapter_dir(tmp_path / step)))
            assert torch.equal(peft_model(input_ids=ids).logits, live)
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
        torch.testing.assert_close(merged(input_ids=ids).logits, live, atol=1e-5, rtol=0)
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in saved)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_export_is_in_the_compute_dtype_with_exact_float32_masters(tmp_path, dtype):
    """Adapter in float32; merged model in the compute dtype for consumers; training (RL's hand-off) reloads the
    float32 merged weights exactly from the masters beside it."""
    from safetensors.torch import load_file as read

    from integration_training.models import load_model

    adapters = adapted(4)
    expected = lora.merged_state(adapters.model.state_dict(), adapters.scalings())
    adapters.writer(final=True, dtype=dtype).save_pretrained(str(tmp_path))
    assert {t.dtype for t in read(str(lora.adapter_dir(tmp_path) / "adapter_model.safetensors")).values()} == {torch.float32}
    assert {t.dtype for t in read(str(tmp_path / "model.safetensors")).values()} == {getattr(torch, dtype)}
    trained_from = load_model(str(tmp_path), dtype, "sdpa", torch.device("cpu"), training=True).state_dict()
    assert all(torch.equal(trained_from[k], v) for k, v in expected.items())
    consumer = load_model(str(tmp_path), dtype, "sdpa", torch.device("cpu"), training=False)
    assert {p.dtype for p in consumer.parameters()} == {getattr(torch, dtype)}


def deploy(config_file: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    from test_distributed import child_env

    return subprocess.run([sys.executable, str(REPO / "deploy.py"), str(config_file), *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def adapter_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(lora.adapter_dir(step_dir) / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def lora_run_config(tmp_path: Path, **sections):
    from test_distributed import two_process_config

    config = two_process_config(tmp_path, "ddp", "sft+rl", model=dict(lora=lora_config(r=4, alpha=16.0)),
                                sft=dict(checkpoint_every=2) | sections.pop("sft", {}),
                                rl=dict(checkpoint_every=1, kl_coef=0.1) | sections.pop("rl", {}),
                                evaluation=dict(num_problems=2) | sections.pop("evaluation", {}),
                                **sections)
    return config


def one_process(config):
    target = dataclasses.replace(config.target, processes_per_node=1, parallelism="none")
    return dataclasses.replace(config, target=target)


# Slow (39 s, four deploy.py processes): the default suite keeps LoRA's pieces at unit level (only adapters change,
# merged export = peft logits, merged sampling restores the base, KL without a second model) and through the chat
# command's LoRA step directories; CI's slow pass runs this whole path.
@pytest.mark.slow
def test_deploy_sft_then_rl_with_lora_writes_adapters_merged_exports_and_resumes_bitwise(tmp_path):
    """One process through deploy.py: layout, merged = base + adapters, SFT→RL hand-off, exact resume."""
    from peft import PeftModel
    from test_distributed import write_config
    from transformers import AutoModelForCausalLM

    config = one_process(lora_run_config(tmp_path))
    config_file = write_config(tmp_path / "cfg.py", config)
    assert_ok(deploy(config_file))
    run = config.output.save_dir / config.output.experiment_name
    sft_dir, rl_dir = run / "checkpoints" / "sft", run / "checkpoints" / "rl"
    sft_mid, sft_final, rl_mid, rl_final = sft_dir / "step_000002", sft_dir / "step_000004", rl_dir / "step_000001", rl_dir / "step_000002"
    for step in (sft_mid, sft_final, rl_mid, rl_final):
        assert (step / "train_state.pt").is_file() and (lora.adapter_dir(step) / "adapter_config.json").is_file()
    assert not (sft_mid / "config.json").exists() and not (rl_mid / "config.json").exists()

    base = load_file(str(Path(config.model.name) / "model.safetensors"))
    sft_merged = load_file(str(sft_final / "model.safetensors"))
    untouched = [k for k in base if not any(f".{n}." in k for n in LLAMA_LINEAR)]
    assert untouched and all(torch.equal(base[k], sft_merged[k]) for k in untouched)  # embedding, norms, head
    assert any(not torch.equal(base[k], sft_merged[k]) for k in base if k not in untouched)

    # SFT→RL: RL's base is SFT's merged model with fresh adapters (its reference is exactly the SFT model).
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    rl_config = json.loads((lora.adapter_dir(rl_final) / "adapter_config.json").read_text())
    assert Path(rl_config["base_model_name_or_path"]).resolve() == sft_final.resolve()
    with torch.no_grad():
        for step, base_dir in ((sft_final, Path(config.model.name)), (rl_final, sft_final)):
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                                   str(lora.adapter_dir(step)))
            merged = AutoModelForCausalLM.from_pretrained(str(step))
            torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)

    # RL sampled with its adapters merged at every step: its base (SFT's merged model) came back bit for bit each
    # time, so the final export is exactly that base + the final adapter.
    rl_base = AutoModelForCausalLM.from_pretrained(str(sft_final))
    peft_model = PeftModel.from_pretrained(rl_base, str(lora.adapter_dir(rl_final)))
    expected = lora.merged_state(rl_base.state_dict(), lora.Adapters(peft_model, rl_base).scalings())
    saved = load_file(str(rl_final / "model.safetensors"))
    assert saved.keys() <= expected.keys()  # (a tied LM head is saved once)
    assert_same(saved, {key: expected[key] for key in saved})

    uninterrupted = {p: adapter_tensors(p) for p in (sft_final, rl_final)}
    merged_before = {p: load_file(str(p / "model.safetensors")) for p in (sft_final, rl_final)}
    # As if killed after SFT's step 2: SFT resumes from the adapter checkpoint, then RL runs.
    shutil.rmtree(sft_final)
    shutil.rmtree(rl_dir)
    assert_ok(deploy(config_file, "--resume"))
    # As if killed after RL's step 1.
    shutil.rmtree(rl_final)
    assert_ok(deploy(config_file, "--resume"))
    for path in (sft_final, rl_final):
        assert_same(adapter_tensors(path), uninterrupted[path])
        assert_same(load_file(str(path / "model.safetensors")), merged_before[path])

    # The evaluation CLI takes the merged export as is.
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "integration_training.evaluate", "--model", str(rl_final),
                             "--dataset", "arithmetic", "--split", "test", "--max-samples", "2", "--k", "1",
                             "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())


# Two deploy.py processes (~21 s on 2 loaded cores) for an exit 2: the message is tested on the model above
# (test_targets_that_match_no_linear_layer_are_user_errors_naming_them), deploy's exit-2 path by test_bad_configs.py.
@pytest.mark.slow
def test_deploy_with_a_target_that_matches_nothing_exits_2_naming_it(tmp_path):
    from test_distributed import write_config

    config = make_config(tmp_path, model=dict(lora=lora_config(["q_proj", "wq"])))
    dry = deploy(write_config(tmp_path / "cfg.py", config), "--dry-run")
    assert dry.returncode == 2 and "'wq' matches no module" in dry.stderr and "Traceback" not in dry.stderr
    result = deploy(write_config(tmp_path / "cfg.py", config))
    assert result.returncode == 2 and "'wq' matches no module" in result.stderr and "Traceback" not in result.stderr


def test_plan_shows_trainable_parameters_and_both_memory_lines(tmp_path):
    from helpers import smollm2_tokenizer
    from integration_training import plan

    config = make_config(tmp_path, model=dict(lora=lora_config(["q_proj", "v_proj"], r=4)))
    # q_proj 64→64 and v_proj 64→32 (GQA) in 2 layers: 4 · ((64+64) + (64+32)) · 2 = 1792 adapter parameters
    assert lora.adapter_parameter_count(tiny_model(len(smollm2_tokenizer()), 0), config.model.lora) == 1792
    text = plan.render_plan(config, "cfg.py", device_note=None)
    assert "LoRA r=4 alpha=8.0 (scale 2)" in text and "0.00M trainable adapter parameters" in text
    assert "memory with LoRA" in text and "full fine-tune would need" in text
    full = plan.render_plan(make_config(tmp_path), "cfg.py", device_note=None)
    assert "memory with LoRA" not in full and "full fine-tune (model.lora=None)" in full


@pytest.mark.parametrize("parallelism,counted", [("none", True), ("ddp", True), ("fsdp2", False)])
def test_plan_counts_the_base_weights_sampling_merges(tmp_path, parallelism, counted):
    """Sampling merges every adapter into a new float32 copy of its base weight while the original waits
    (lora.merged_for_sampling): the plan's sampling stage holds that copy too, except under FSDP2 (sampled unmerged)."""
    from helpers import smollm2_tokenizer
    from integration_training import plan

    model = tiny_model(len(smollm2_tokenizer()), 0)
    config = make_config(tmp_path, output={"mode": "rl", "source_checkpoint": str(tmp_path / "tiny_model")},
                         model=dict(lora=lora_config(["q_proj", "v_proj"])))
    # q_proj 64×64 and v_proj 64×32 in each of 2 layers
    assert lora.adapted_weight_count(model, config.model.lora) == (64 * 64 + 64 * 32) * 2
    everything = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert lora.adapted_weight_count(model, lora_config()) == everything - model.lm_head.in_features * model.lm_head.out_features
    config = dataclasses.replace(config, target=dataclasses.replace(config.target, parallelism=parallelism))
    shape = plan.model_shape(model.config)
    merged = 2**28  # 1 GiB of float32: large enough to read in the plan's two-decimal GiB
    lines = "\n".join(plan._memory_lines(config, 10**6, 10**4, shape, merged=merged))
    without = "\n".join(plan._memory_lines(config, 10**6, 10**4, shape, merged=0))
    assert ("LoRA's merged weights 1.00 GiB" in lines) == counted, lines
    difference = plan.predicted_peak_bytes(lines) - plan.predicted_peak_bytes(without)
    assert abs(difference - (2**30 if counted else 0)) < 0.02 * 2**30, (difference, lines)
    full = dataclasses.replace(config, model=dataclasses.replace(config.model, lora=None))
    assert "merged" not in "\n".join(plan._memory_lines(full, 10**6, None, shape, merged=merged))


# ---------------------------------------------------------------------------------------------------- DDP / FSDP2


# Two-process runs (~40 s each on 2 loaded cores): the slow pass. The default suite keeps LoRA through deploy.py
# (one process) and DDP/FSDP2 equivalence without LoRA (test_distributed.py).
@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_two_process_lora_sft_equals_one_process(tmp_path, parallelism):
    from test_distributed import two_process_config, write_config

    sections = dict(model=dict(lora=lora_config(r=4, alpha=16.0)), sft=dict(optimizer=dict(matrix_lr=1e-2)))
    two = two_process_config(tmp_path, parallelism, "sft", **sections)
    single = one_process(dataclasses.replace(two, output=dataclasses.replace(two.output, experiment_name="single")))
    for config in (two, single):
        assert_ok(deploy(write_config(tmp_path / f"{config.output.experiment_name}.py", config)))
    finals = [c.output.save_dir / c.output.experiment_name / "checkpoints" / "sft" / "step_000004" for c in (two, single)]
    initial = lora.adapter_state(lora.prepare(tiny_model(100, 0), model_config(two.model.lora), None, 0).model.state_dict())
    moved = max(float(t.abs().max()) for k, t in adapter_tensors(finals[1]).items() if "lora_B" in k)
    assert moved > 1e-3 and initial  # the adapters moved far enough to tell runs apart
    assert_same(adapter_tensors(finals[0]), adapter_tensors(finals[1]), atol=1e-6)
    assert_same(load_file(str(finals[0] / "model.safetensors")), load_file(str(finals[1] / "model.safetensors")), atol=1e-6)


@pytest.mark.slow  # two processes (~18 s on 2 loaded cores); see above
def test_two_process_lora_rl_step_with_kl_equals_one_process(tmp_path):
    """One RL step (adapters, KL against adapters-off) on fixed rows: DDP and FSDP2 over 2 ranks = 1 process."""
    from test_distributed import SINGLE, child_env, free_port

    save_tiny_model_dir(tmp_path / "tiny_model")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               __file__, str(tmp_path)]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO / "tests")
    assert result.returncode == 0, result.stderr[-4000:]
    expected, initial = rl_update(tmp_path, SINGLE, "none")
    assert max(float((expected[k] - initial[k]).abs().max()) for k in initial) > 1e-4
    for parallelism in ("ddp", "fsdp2"):
        assert_same(torch.load(tmp_path / f"rl_{parallelism}.pt", weights_only=True), expected, atol=1e-6)


def fixed_rows(seed: int) -> list:
    """8 completions (4 prompts × 2) with distinct advantages: the same rows for every world size."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for p in range(4):
        prompt = [int(t) for t in torch.randint(1, 100, (3 + p,), generator=generator)]
        for s in range(2):
            completion = [int(t) for t in torch.randint(1, 100, (2 + s + p % 2,), generator=generator)]
            rows.append(rl.Sequence_(prompt, completion, [-1.0] * len(completion), (-1.0) ** s * (0.5 + p / 4), 0.0))
    return rows


def rl_update(tmp_path: Path, dist, parallelism: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors after one LoRA RL step with kl_coef > 0 on this rank's share of the fixed rows, before)."""
    from integration_training import distributed
    from integration_training.models import load_model

    config = make_config(tmp_path, model=dict(lora=lora_config(r=4, alpha=16.0)),
                         rl=dict(kl_coef=0.5, batch_size=2, optimizer=dict(matrix_lr=1e-2)))
    target = dataclasses.replace(config.target, processes_per_node=dist.world_size, parallelism=parallelism)
    policy = load_model(config.model.name, "float32", "sdpa", dist.device, training=True)
    policy.train()
    adapters = lora.prepare(policy, config.model, None, 0)
    before = {k: v.detach().clone() for k, v in lora.adapter_state(policy.state_dict()).items()}
    rows = fixed_rows(0)
    mine = [row for i, row in enumerate(rows) if (i // 2) % dist.world_size == dist.rank]  # whole groups per rank
    model = distributed.wrap_model(policy, target, dist, "float32")
    optimizer = optim.build_optimizer(policy, config.rl.optimizer)
    rl.train_on_rows(rl.PolicyModels.of(model, adapters.reference(), config.model),
                     optimization(optimizer, config.rl.optimizer.grad_clip, dist), mine, rl=config.rl, pad_id=0)
    if distributed.is_sharded(target, dist):
        after = lora.adapter_state(distributed.full_model_state(policy, prefix=""))
    else:
        after = lora.adapter_state(policy.state_dict())
    return {k: v.detach().clone() for k, v in after.items()}, before


def _worker(out_dir: Path) -> None:
    import os

    from integration_training import distributed
    from integration_training.config import TargetConfig

    for parallelism in ("ddp", "fsdp2"):
        target = TargetConfig(gpu_ranks=[], device_type="cpu", processes_per_node=2, parallelism=parallelism,
                              num_nodes=1, node_rank=0, master_addr="127.0.0.1", master_port=int(os.environ["MASTER_PORT"]))
        dist = distributed.init_distributed(target)
        after, _ = rl_update(out_dir, dist, parallelism)
        if dist.is_main:
            torch.save(after, out_dir / f"rl_{parallelism}.pt")
        distributed.barrier(dist)
    distributed.destroy_distributed(dist)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))


@pytest.mark.parametrize("r,alpha,dropout", [(2, 4.0, 0.0), (8, 4.0, 0.25)])
def test_rank_alpha_and_dropout_reach_every_adapted_layer(r, alpha, dropout):
    """r sets the adapters' shapes, alpha / r their scale on the output, dropout the adapters' input dropout."""
    adapters = lora.prepare(tiny_model(VOCAB, 0), model_config(lora_config(("q_proj",), r=r, alpha=alpha,
                                                                           dropout=dropout)), None, 0)
    assert set(adapters.scalings().values()) == {alpha / r}
    layers = [m for m in adapters.model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 2
    for layer in layers:
        assert layer.lora_A["default"].weight.shape[0] == r and layer.lora_B["default"].weight.shape[1] == r
        drop = layer.lora_dropout["default"]
        assert (drop.p if isinstance(drop, torch.nn.Dropout) else 0.0) == dropout
    # The scale acts on the output: doubling alpha doubles the adapters' contribution.
    x = torch.randn(3, layers[0].in_features)
    layer = layers[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.eval()
        base = layer.base_layer(x)
        delta = layer(x) - base
        layer.scaling["default"] *= 2
        torch.testing.assert_close(layer(x) - base, 2 * delta, rtol=1e-5, atol=1e-6)
