"""Config fields and RL options, each shown to have its effect (not only to run).

Every test here fails when the named field's effect is removed; tests/test_config_coverage.py maps each config
field to such a test.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from helpers import make_config, optimization, smollm2_tokenizer, tiny_model
from integration_training import cli, models, rl
from integration_training.config import ModelConfig, to_json
from integration_training.distributed import Dist

CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
F32 = ModelConfig(name="unused", dtype="float32", compile=False, attn_implementation="sdpa", gradient_checkpointing=False,
                  lora=None)
VOCAB = 96


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_config(path: Path, config) -> Path:
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n")
    return path


# ---------------------------------------------------------------------------------------------------- RL: KL, clip


def rl_config(**overrides):
    from helpers import replace_nested

    return replace_nested(make_config_rl(), overrides)


def make_config_rl():
    from test_rl import _rl_cfg

    return _rl_cfg(batch_size=3)


def on_policy_rows(model, seed: int = 0) -> list[rl.Sequence_]:
    """Two groups of three completions with ± advantages; old log-probs are the model's own (ratio 1 exactly)."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    advantages = rl.group_advantages(rewards, "mean")
    rows = []
    for p in range(2):
        prompt = torch.randint(1, VOCAB, (3 + p,), generator=gen).tolist()
        for s in range(3):
            completion = torch.randint(1, VOCAB, (2 + s,), generator=gen).tolist()
            row = rl.Sequence_(prompt, completion, [0.0] * len(completion), float(advantages[p, s]), float(rewards[p, s]))
            with torch.no_grad():
                old, _ = rl.completion_logprobs(model, rl.build_batch([row], 0, torch.device("cpu")), False, "float32")
            rows.append(dataclasses.replace(row, old_logprobs=old.tolist()))
    return rows


def perturbed(model, scale: float, seed: int = 1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other.requires_grad_(False)


class NoStep:
    """An optimizer stand-in that never moves the weights and records the gradients it was asked to apply."""

    def __init__(self, model) -> None:
        self.model, self.grads = model, []
        self.param_groups = [{"params": list(model.parameters())}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def test_kl_is_zero_against_itself_and_grows_with_divergence():
    from test_rl import tiny_llama

    model = tiny_llama(VOCAB)
    rows = on_policy_rows(model)
    kls = []
    for scale in (0.0, 0.02, 0.1):
        stats = rl.train_on_rows(rl.PolicyModels.of(model, perturbed(model, scale), F32), optimization(NoStep(model)), rows, rl=rl_config(kl_coef=0.1), pad_id=0)
        kls.append(stats["kl"])
    assert kls[0] == pytest.approx(0.0, abs=1e-6), kls
    assert 0.0 < kls[1] < kls[2], kls


def test_kl_coef_adds_the_gradient_of_the_penalty():
    from test_rl import tiny_llama

    model = tiny_llama(VOCAB)
    rows = on_policy_rows(model)
    ref = perturbed(model, 0.1)
    grads = {}
    for coef in (0.0, 0.5):
        optimizer = NoStep(model)
        rl.train_on_rows(rl.PolicyModels.of(model, ref, F32), optimization(optimizer), rows, rl=rl_config(kl_coef=coef), pad_id=0)
        grads[coef] = optimizer.grads[0]
    difference = max(float((grads[0.0][n] - grads[0.5][n]).abs().max()) for n in grads[0.0])
    assert difference > 1e-6, "kl_coef changed nothing in the gradient"


def test_clip_fraction_is_zero_inside_the_band_and_positive_outside():
    from test_rl import tiny_llama

    # Without a weight change the ratio stays exactly 1: nothing is clipped over two updates.
    model = tiny_llama(VOCAB)
    rows = on_policy_rows(model)
    inside = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(NoStep(model)), rows, rl=rl_config(updates_per_batch=2, clip_eps=0.2), pad_id=0)
    assert inside["clip_frac"] == 0.0
    # A big SGD step after the first update pushes ratios out of [0.8, 1.2]: the second update clips some tokens.
    fractions = {}
    for eps in (0.2, 1e6):
        model = tiny_llama(VOCAB)
        optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
        stats = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(optimizer), rows, rl=rl_config(updates_per_batch=2, clip_eps=eps), pad_id=0)
        fractions[eps] = stats["clip_frac"]
    assert fractions[0.2] > 0.0, fractions
    assert fractions[1e6] == 0.0, fractions  # the band, not the step, decides what is clipped


def test_rl_grad_clip_bounds_the_applied_gradient_and_reports_the_unclipped_norm():
    from test_rl import tiny_llama

    model = tiny_llama(VOCAB)
    rows = on_policy_rows(model)
    norms = {}
    for clip in (0.0, 1e-3):
        optimizer = NoStep(model)
        stats = rl.train_on_rows(rl.PolicyModels.of(model, None, F32), optimization(optimizer, clip), rows,
                                 rl=rl_config(optimizer=dict(grad_clip=clip)), pad_id=0)
        applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in optimizer.grads[0].values()]))
        norms[clip] = (stats["grad_norm"], float(applied))
    assert norms[0.0][0] == pytest.approx(norms[0.0][1], rel=1e-4) and norms[0.0][1] > 1e-2
    assert norms[1e-3][0] == pytest.approx(norms[0.0][0], rel=1e-5)  # reported before clipping
    assert norms[1e-3][1] == pytest.approx(1e-3, rel=1e-3)


def test_temperature_and_top_k_shape_what_is_drawn():
    """Token frequencies follow softmax(logits / temperature) restricted to the top k (seeded, 20000 draws)."""
    from integration_training.rollout import pick_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)

    def frequencies(temperature, top_k):
        tokens, logprobs = pick_tokens(logits, temperature, top_k, torch.Generator().manual_seed(0))
        torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))
        return torch.bincount(tokens, minlength=3).double() / len(tokens)

    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits[0].double() / temperature, -1)
        torch.testing.assert_close(frequencies(temperature, 0), expected, rtol=0, atol=0.015)
    expected = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64) / 2.0, -1)
    got = frequencies(2.0, 2)
    assert got[0] == 0.0  # outside the top 2: never drawn
    torch.testing.assert_close(got[1:], expected, rtol=0, atol=0.015)


# ---------------------------------------------------------------------------------------------------- RL: length


def test_rl_max_length_drops_prompts_over_the_budget_and_keeps_the_boundary():
    from integration_training import problems
    from integration_training.data import build_mixture
    from integration_training.template import render_prompt
    from helpers import arithmetic

    tokenizer = smollm2_tokenizer()
    examples = build_mixture([arithmetic("train", 32)], seed=0).examples
    lengths = [len(render_prompt(tokenizer, list(e.messages[:-1]))) for e in examples]
    assert len(set(lengths)) >= 3, "need varied prompt lengths"
    max_new_tokens = 5
    sampling = types.SimpleNamespace(max_new_tokens=max_new_tokens)
    for budget in sorted(set(lengths))[:-1]:
        kept = problems.drop_overlong(examples, tokenizer, budget + max_new_tokens, sampling, "rl")
        assert kept == [e for e, n in zip(examples, lengths) if n <= budget]
    from integration_training.errors import UserError

    with pytest.raises(UserError, match="max_length"):
        problems.drop_overlong(examples, tokenizer, min(lengths) - 1 + max_new_tokens, sampling, "rl")


# ---------------------------------------------------------------------------------------------------- RL optimizer


def test_rl_run_takes_every_rl_field_from_the_rl_section(tmp_path, monkeypatch):
    """A run_rl with distinct rl.* values: the optimizer's groups, the logged LR schedule, the rollouts' sampler
    settings and the rows trained per step all follow the rl section (never sft.*); RL's own evaluations (every
    evaluation.every_rl_steps) follow the evaluation section (never rl.*)."""
    import json

    from integration_training import optim, rollout
    from integration_training.metrics import read_metrics

    base = make_config(tmp_path)
    config = make_config(
        tmp_path,
        rl=dict(num_iterations=4, examples_per_step=2, num_samples=3, batch_size=3, checkpoint_every=100,
                optimizer=dict(embedding_lr=3e-4, unembedding_lr=2e-4, matrix_lr=1e-4, weight_decay=0.125,
                               init_lr_frac=0.5, warmup_ratio=0.5, lr_schedule="linear"),
                sampling=dict(batch_size=5, temperature=0.7, top_k=5, max_new_tokens=2)),
        evaluation=dict(num_problems=3, num_samples=2, every_rl_steps=2, after_rl=False,
                        sampling=dict(batch_size=7, temperature=0.9, top_k=3, max_new_tokens=3)),
        output=dict(mode="rl", source_checkpoint=base.model.name),
    )
    built, sampled, trained = [], [], []
    build, sample, train = optim.build_optimizer, rollout.sample, rl.train_on_rows

    def recording_build(model, stage):
        built.append((stage, build(model, stage)))
        return built[-1][1]

    def recording_sample(model, prompts, **kwargs):
        sampled.append((len(prompts), kwargs["num_samples"], kwargs["settings"], kwargs))
        return sample(model, prompts, **kwargs)

    def recording_train(models, optimization, rows, **kwargs):
        trained.append([(tuple(r.prompt_ids), r.advantage) for r in rows])
        return train(models, optimization, rows, **kwargs)

    monkeypatch.setattr(optim, "build_optimizer", recording_build)
    monkeypatch.setattr(rollout, "sample", recording_sample)
    monkeypatch.setattr(rl, "train_on_rows", recording_train)
    rl.run_rl(config, tmp_path / "run", config.output.source_checkpoint, resume=False)

    ((stage, optimizer),) = built
    assert stage is config.rl.optimizer
    assert {g["base_lr"] for g in optimizer.param_groups} == {3e-4, 2e-4, 1e-4}
    assert 0.125 in {g["weight_decay"] for g in optimizer.param_groups}
    rows = [r for r in read_metrics(tmp_path / "run", "rl") if "lr_multiplier" in r]
    # warmup W = round(0.5 × 4) = 2 steps up to init_lr_frac 0.5, then linear towards 0 over the other 2.
    assert [r["lr_multiplier"] for r in rows] == pytest.approx([0.25, 0.5, 0.5, 0.25])

    # Sampling calls: (prompts, samples per prompt, SamplingSettings, keyword arguments).
    evals = [c for c in sampled if c[3]["greedy_first"]]
    rollouts = [c for c in sampled if not c[3]["greedy_first"]]
    assert [c[0] for c in evals] == [3, 3]  # evaluation.num_problems, at steps 2 and 4 (every_rl_steps=2)
    eval_settings = rollout.SamplingSettings(max_new_tokens=3, temperature=0.9, top_k=3, batch_size=7)
    assert all(c[1] == 2 + 1 and c[2] == eval_settings for c in evals)  # num_samples + one greedy row
    rollout_settings = rollout.SamplingSettings(max_new_tokens=2, temperature=0.7, top_k=5, batch_size=5)
    assert len(rollouts) == 4 and all(c[0] == 2 and c[1] == 3 and c[2] == rollout_settings for c in rollouts)
    # Training: examples_per_step × num_samples rows per step, groups of num_samples sharing a prompt.
    assert [len(step) for step in trained] == [6, 6, 6, 6]
    for step in trained:
        assert all(len({p for p, _ in step[g : g + 3]}) == 1 for g in (0, 3))
    records = (tmp_path / "run" / "eval" / "rl_step_000004.jsonl").read_text().splitlines()
    assert [len(json.loads(line)["strict"]) for line in records] == [2, 2, 2]  # num_samples per problem


# ---------------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("at_start,after_sft", [(True, False), (False, True)])
def test_evaluation_flags_choose_which_sft_run_evaluations_happen(tmp_path, at_start, after_sft):
    """mode "sft" through cli.dispatch: evaluation.at_start scores model.name before SFT, evaluation.after_sft
    scores SFT's final checkpoint; each flag alone writes exactly its own records."""
    config = make_config(tmp_path, sft=dict(num_iterations=1),
                         evaluation=dict(at_start=at_start, after_sft=after_sft, num_problems=2))
    run = tmp_path / "run"
    run.mkdir()
    cli.dispatch(config, run, resume=False)
    written = sorted(p.name for p in (run / "eval").glob("*.jsonl"))
    expected = (["baseline_step_000000.jsonl"] if at_start else []) + (["sft_step_000001.jsonl"] if after_sft else [])
    assert written == expected


# ---------------------------------------------------------------------------------------------------- target


def test_gpu_ranks_become_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # whatever the host had
    config = make_config(tmp_path, target=dict(device_type="cuda", gpu_ranks=[3, 5], processes_per_node=2,
                                               parallelism="ddp"), sft=dict(examples_per_step=4))
    assert cli.main([str(write_config(tmp_path / "c.py", config)), "--dry-run"]) == 0
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


# ---------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("dtype,attn", [("bfloat16", "eager"), ("float32", "sdpa")])
def test_model_dtype_and_attention_reach_the_loaded_model(tmp_path, dtype, attn):
    """Sampling loads weights in the compute dtype; training keeps float32 masters and computes in the dtype."""
    from helpers import save_tiny_model_dir
    from integration_training import precision

    path = str(save_tiny_model_dir(tmp_path / "m"))
    sampler = models.load_model(path, dtype, attn, torch.device("cpu"), training=False)
    assert {p.dtype for p in sampler.parameters()} == {getattr(torch, dtype)}
    assert sampler.config._attn_implementation == attn
    trainer = models.load_model(path, dtype, attn, torch.device("cpu"), training=True)
    assert {p.dtype for p in trainer.parameters()} == {torch.float32}
    assert trainer.config._attn_implementation == attn
    with precision.autocast(torch.device("cpu"), dtype):
        logits = trainer(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == getattr(torch, dtype)


class Recorder:
    """Records every models.load_model call (its arguments and the model) while delegating to the real one."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[tuple, dict, object]] = []
        original = models.load_model

        def recording(*args, **kwargs):
            model = original(*args, **kwargs)
            self.calls.append((args, kwargs, model))
            return model

        monkeypatch.setattr(models, "load_model", recording)


def fake_wandb(monkeypatch) -> list:
    """A stand-in `wandb` module: the run's init/log/finish calls land in the returned list."""
    events: list = []

    class Run:
        def log(self, values):
            events.append(("log", dict(values)))

        def finish(self):
            events.append(("finish",))

    def init(**kwargs):
        events.append(("init", kwargs))
        return Run()

    # A module spec, as an installed package has: accelerate (imported by transformers) asks find_spec("wandb").
    import importlib.machinery

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=init, __spec__=importlib.machinery.ModuleSpec("wandb", None)))
    return events


def test_model_and_output_fields_reach_both_stages_of_a_run(tmp_path, monkeypatch):
    """One deploy.py run (sft+rl) with non-default model/output knobs: dtype, attention, gradient checkpointing,
    compile, log level, wandb, each stage's optimizer, and SFT's and RL's log/eval cadence are each seen where they
    act."""
    from integration_training.metrics import read_metrics

    from integration_training import precision

    loads = Recorder(monkeypatch)
    autocast_dtypes = []
    original_autocast = precision.autocast

    def recording_autocast(device, name):
        autocast_dtypes.append(name)
        return original_autocast(device, name)

    monkeypatch.setattr(precision, "autocast", recording_autocast)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stepped = []  # the class of every optimizer step taken, in order
    hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stepped.append(type(optimizer).__name__))
    config = make_config(
        tmp_path,
        model=dict(dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=True, compile=True),
        sft=dict(num_iterations=4, log_every=2, eval_every=3, checkpoint_every=100, optimizer=dict(name="muon")),
        rl=dict(num_iterations=4, log_every=3, checkpoint_every=100, sampling=dict(max_new_tokens=2)),
        evaluation=dict(every_rl_steps=2, num_problems=1, sampling=dict(max_new_tokens=2)),
        output=dict(mode="sft+rl", log_level="WARNING", use_wandb=True, wandb_project="proj-x",
                    experiment_name="knobs"),
    )
    # After make_config: importing transformers' model code (accelerate) looks wandb up, which a stand-in module
    # without a __spec__ would break when this test runs alone.
    events = fake_wandb(monkeypatch)
    try:
        assert cli.main([str(write_config(tmp_path / "knobs.py", config))]) == 0
    finally:
        hook.remove()
    run = tmp_path / "results" / "knobs"

    # sft.optimizer="muon": each of SFT's 4 steps steps torch's Muon (matrices) beside AdamW (the rest); RL's
    # optimizer stays "adamw" (its own field): its 4 steps are AdamW alone.
    assert stepped == ["Muon", "AdamW"] * 4 + ["AdamW"] * 4, stepped

    # model.*: every load (baseline eval, SFT, after-SFT eval, RL, after-RL eval) asked for the configured dtype and
    # attention; the two trained models checkpoint activations; every autocast (SFT and RL forwards, sampling)
    # computes in bfloat16.
    assert [kwargs["training"] for _, kwargs, _ in loads.calls] == [False, True, False, True, False]
    for args, _, model in loads.calls:
        assert args[1:3] == ("bfloat16", "eager"), args
        assert model.config._attn_implementation == "eager"
    assert [model.is_gradient_checkpointing for _, kwargs, model in loads.calls if kwargs["training"]] == [True, True]
    assert autocast_dtypes and set(autocast_dtypes) == {"bfloat16"}
    assert len(compiled) == 1  # SFT's training module

    # output.log_level: WARNING keeps every INFO record out of train.log (an INFO run writes many).
    assert (run / "train.log").is_file() and " INFO " not in (run / "train.log").read_text()

    # output.use_wandb / wandb_project: one wandb run per stage, fed the stage's metrics; the evaluation stage's run
    # ("eval", one id kept in the run directory) is resumed by each of its evaluations.
    inits = [e[1] for e in events if e[0] == "init"]
    assert [(i["project"], i["name"]) for i in inits] == [
        ("proj-x", "knobs-eval"), ("proj-x", "knobs-sft"), ("proj-x", "knobs-eval"), ("proj-x", "knobs-rl"),
        ("proj-x", "knobs-eval")]
    assert len({i["id"] for i in inits if i["name"] == "knobs-eval"}) == 1
    logged = {k for e in events if e[0] == "log" for k in e[1]}
    assert {"sft/loss", "sft/val_loss", "rl/reward", "rl/eval/pass@1_strict", "eval/pass@1_strict"} <= logged
    assert [e[0] for e in events].count("finish") == 5

    # Cadence: sft.log_every=2, sft.eval_every=3 over 4 steps; rl.log_every=3 and evaluation.every_rl_steps=2 over
    # 4 steps (the final step's evaluation is the after-RL one, an `eval` line).
    sft = read_metrics(run, "sft")
    assert [r["step"] for r in sft if "loss" in r] == [2, 4]
    assert [r["step"] for r in sft if "val_loss" in r] == [0, 3, 4]
    rows = read_metrics(run, "rl")
    assert [r["step"] for r in rows if "reward" in r] == [2, 3, 4]
    assert [r["step"] for r in rows if "eval/pass@1_strict" in r] == [2]
    assert [(r["evaluated"], r["step"]) for r in read_metrics(run, "eval")] == [("baseline", 0), ("sft", 4), ("rl", 4)]


# ---------------------------------------------------------------------------------------------------- target.device_type


class StopAtLoad(Exception):
    """Raised by a stand-in models.load_model once the run has said which device it loads onto."""

    def __str__(self) -> str:
        return "stopped by the test at the first load"


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
def test_device_type_decides_where_a_deploy_run_loads_the_model(tmp_path, monkeypatch, capsys, device_type):
    """deploy.py's real run (not --dry-run) puts the model on the device target.device_type names: cuda:LOCAL_RANK
    (after gpu_ranks became CUDA_VISIBLE_DEVICES), mps, or cpu. The GPU/MPS presence is faked, so the run stops
    at the first load instead of touching a device this machine lacks."""
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device_type == "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if device_type == "cuda" else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device_type == "mps")
    devices = []

    def load_model(path, dtype, attn, device, **kwargs):
        devices.append(torch.device(device))
        raise StopAtLoad

    monkeypatch.setattr(models, "load_model", load_model)
    target = dict(device_type=device_type, gpu_ranks=[6] if device_type == "cuda" else [])
    config = make_config(tmp_path, target=target, output=dict(experiment_name=f"on-{device_type}"))
    # The run reports a model that cannot be loaded as a user error (exit 2), the stand-in's exception named.
    assert cli.main([str(write_config(tmp_path / "c.py", config))]) == 2
    expected = {"cpu": torch.device("cpu"), "cuda": torch.device("cuda", 0), "mps": torch.device("mps")}
    assert devices == [expected[device_type]]
    assert "stopped by the test at the first load" in capsys.readouterr().err
    if device_type == "cuda":
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"  # GPU 6 is this process's cuda:0


# ---------------------------------------------------------------------------------------------------- data fields


def marked_rows(directory: Path, name: str, prefix: str, count: int, gsm8k: bool) -> Path:
    """`count` rows whose user turn carries a unique marker "<prefix>NNN" (written in GSM8K's schema, with a
    calculator annotation the GSM8K adapter removes, or as custom_json conversations)."""
    import json

    lines = []
    for i in range(count):
        question = f"Row {prefix}{i:03d}: what is {i} plus {i}?"
        if gsm8k:
            row = {"question": question, "answer": f"Twice {i} is <<{i}+{i}={2 * i}>>{2 * i}.\n#### {2 * i}"}
        else:
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{2 * i}"}],
                   "reference": str(2 * i)}
        lines.append(json.dumps(row))
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def spec(name, path, split="train", subset=None, max_samples=None, repeat=1, reward=None):
    from integration_training.config import DatasetSpec

    return DatasetSpec(name=name, split=split, subset=subset, max_samples=max_samples, repeat=repeat,
                       path=str(path), reward=reward)


class TrainedRows:
    """The token rows each training model's embedding sees with gradients on (SFT's and RL's training forwards,
    not validation, evaluation or sampling), recorded through a stand-in models.load_model."""

    def __init__(self, monkeypatch) -> None:
        self.rows: list[list[int]] = []
        original = models.load_model

        def recording(*args, **kwargs):
            model = original(*args, **kwargs)
            if kwargs.get("training"):
                model.get_input_embeddings().register_forward_hook(self._record)
            return model

        monkeypatch.setattr(models, "load_model", recording)

    def _record(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self.rows += inputs[0].tolist()

    def markers(self, pattern: str) -> list[str]:
        """The marker of each recorded row, in training order (each row holds one conversation)."""
        import re

        tokenizer = smollm2_tokenizer()
        found = [re.findall(pattern, tokenizer.decode(row)) for row in self.rows]
        assert all(len(f) == 1 for f in found), [tokenizer.decode(r) for r, f in zip(self.rows, found) if len(f) != 1]
        return [f[0] for f in found]


def test_dataset_specs_and_shuffle_seed_decide_what_sft_trains_on(tmp_path, monkeypatch):
    """Two deploy.py SFT runs that differ only in data.shuffle_seed. Each trains on exactly: a seeded sample of
    `max_samples` rows of the GSM8K-schema file that `path` + `subset` + `split` select (not the decoy beside it,
    not the test split), each `repeat` times and read by the adapter `name` picks (calculator annotations gone),
    plus every row of a custom_json file. The seed changes the order (and the sample), never the composition."""
    import collections

    data = tmp_path / "data"
    marked_rows(data, "main/train.jsonl", "G", 12, gsm8k=True)
    marked_rows(data, "main/test.jsonl", "T", 6, gsm8k=True)
    marked_rows(data, "train.jsonl", "X", 6, gsm8k=True)  # what subset=None would read
    custom = marked_rows(data, "extra.jsonl", "C", 2, gsm8k=False)
    val = marked_rows(data, "val.jsonl", "V", 2, gsm8k=False)
    mixture = [spec("openai/gsm8k", data, subset="main", max_samples=3, repeat=2), spec("custom_json", custom)]
    orders = {}
    for seed in (1, 2):
        rows = TrainedRows(monkeypatch)
        config = make_config(
            tmp_path,
            data=dict(sft_mixture=mixture, sft_val_mixture=[spec("custom_json", val)], shuffle_seed=seed),
            sft=dict(num_epochs=1, num_iterations=-1, batch_size=2, examples_per_step=2, eval_every=100),
            evaluation=dict(at_start=False, after_sft=False),
            output=dict(experiment_name=f"seed{seed}"),
        )
        assert cli.main([str(write_config(tmp_path / f"seed{seed}.py", config))]) == 0
        trained = rows.markers(r"Row ([A-Z]\d{3}):")
        counts = collections.Counter(trained)
        gsm8k = sorted(m for m in counts if m.startswith("G"))
        assert len(gsm8k) == 3 and all(counts[m] == 2 for m in gsm8k), counts  # max_samples, repeat, subset, split
        assert set(counts) == set(gsm8k) | {"C000", "C001"} and counts["C000"] == counts["C001"] == 1, counts
        assert not any("<<" in smollm2_tokenizer().decode(r) for r in rows.rows)  # the GSM8K adapter's cleaning
        orders[seed] = trained
    assert orders[1] != orders[2], orders  # data.shuffle_seed


# ---------------------------------------------------------------------------------------------------- RL rows


SCORED: list[tuple[str, str, float]] = []


def score_by_characters(completion: str, reference: str) -> float:
    """A custom reward ("module:function") with many distinct values, so group std != 1 and groups differ."""
    value = float((sum(map(ord, completion)) + len(reference)) % 7)
    SCORED.append((completion, reference, value))
    return value


def test_rl_rows_carry_the_custom_reward_the_advantage_kind_and_the_seeded_prompt_order(tmp_path, monkeypatch):
    """Two deploy.py RL runs (mode="rl"): every completion is scored by DatasetSpec.reward's function (the held-out
    evaluation, arithmetic, keeps its own verifier) and the rows RL trains on carry those rewards, centred per group ("mean") or also scaled by the group std ("mean_std");
    data.shuffle_seed changes the order the prompts are visited in, each prompt once per epoch either way."""
    import re

    prompts = marked_rows(tmp_path / "data", "prompts.jsonl", "P", 6, gsm8k=False)
    reward = f"{__name__}:score_by_characters"
    base = make_config(tmp_path)
    tokenizer = smollm2_tokenizer()
    visits = {}
    trained: list[list[rl.Sequence_]] = []
    train = rl.train_on_rows

    def recording_train(models, optimization, rows, **kwargs):
        trained.append(list(rows))
        return train(models, optimization, rows, **kwargs)

    monkeypatch.setattr(rl, "train_on_rows", recording_train)
    for seed, kind in ((1, "mean"), (2, "mean_std")):
        SCORED.clear()
        trained.clear()
        config = make_config(
            tmp_path,
            data=dict(rl_mixture=[spec("custom_json", prompts, reward=reward)], shuffle_seed=seed),
            rl=dict(num_epochs=1, num_iterations=-1, examples_per_step=2, num_samples=4, batch_size=8,
                    sampling=dict(batch_size=8, max_new_tokens=3), advantage=kind),
            evaluation=dict(num_problems=1, sampling=dict(max_new_tokens=2)),
            output=dict(mode="rl", source_checkpoint=base.model.name, experiment_name=f"rl-{kind}"),
        )
        assert cli.main([str(write_config(tmp_path / f"rl-{kind}.py", config))]) == 0
        rows = [r for step in trained for r in step]
        assert len(trained) == 3 and len(rows) == 3 * 2 * 4
        # DatasetSpec.reward: each row's reward is what the custom function returned for it, in sampling order.
        assert [r.reward for r in rows] == [value for _, _, value in SCORED]
        assert len({r.reward for r in rows}) >= 3
        # rl.advantage: per group of num_samples rows sharing a prompt, by hand.
        for g in range(0, len(rows), 4):
            group = rows[g : g + 4]
            assert len({tuple(r.prompt_ids) for r in group}) == 1
            rewards = [r.reward for r in group]
            mean = sum(rewards) / 4
            std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / 3)
            for r, x in zip(group, rewards):
                want = 0.0 if std == 0 else (x - mean) / (std + rl.STD_EPS if kind == "mean_std" else 1.0)
                assert r.advantage == pytest.approx(want, abs=1e-5), (kind, rewards)
        assert any(abs(r.advantage) > 1e-3 for r in rows)
        visits[seed] = [re.findall(r"Row (P\d{3}):", tokenizer.decode(rows[g].prompt_ids))[0] for g in range(0, len(rows), 4)]
    # data.shuffle_seed: each prompt once in the one epoch, in an order the seed decides.
    assert sorted(visits[1]) == sorted(visits[2]) == [f"P{i:03d}" for i in range(6)]
    assert visits[1] != visits[2], visits
