"""Optimizer parameter groups, per-group LRs, weight decay, Muon, and the LR schedule."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from helpers import optimizer_config, tiny_model
from integration_training.config import OptimizerConfig
from integration_training.optim import MultiOptimizer, apply_lr, build_optimizer, lr_multiplier, parameter_groups

VOCAB = 97


def settings(**fields) -> OptimizerConfig:
    """AdamW at LR 1e-2 for every group, constant, no warmup, no clipping; `fields` override."""
    return optimizer_config(lr=1e-2, grad_clip=0.0, **fields)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def one_step(model, optimizer, zero_grads: bool = False) -> None:
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if zero_grads:
        for p in model.parameters():
            p.grad.zero_()
    optimizer.step()
    optimizer.zero_grad()


def changed(before, model) -> dict[str, bool]:
    return {name: not torch.equal(before[name], p) for name, p in model.named_parameters()}


def test_parameter_groups_untied_and_tied():
    model = tiny_model(VOCAB, 0)
    groups = parameter_groups(model)
    assert groups["embedding"] == [model.model.embed_tokens.weight]
    assert groups["unembedding"] == [model.lm_head.weight]
    assert all(p.ndim == 2 for p in groups["matrix"]) and len(groups["matrix"]) == 2 * 7  # q,k,v,o,gate,up,down
    assert all(p.ndim == 1 for p in groups["other"])  # RMSNorm weights
    total = sum(len(v) for v in groups.values())
    assert total == len(list(model.parameters()))

    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied = parameter_groups(model)
    assert tied["unembedding"] == [] and tied["embedding"] == [model.model.embed_tokens.weight]


def test_base_lr_recorded_and_apply_lr():
    model = tiny_model(VOCAB, 0)
    opt = build_optimizer(model, settings(embedding_lr=1.0, unembedding_lr=2.0, matrix_lr=3.0))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {k: g["base_lr"] for k, g in by_name.items()} == {"embedding": 1.0, "unembedding": 2.0, "matrix": 3.0, "other": 3.0}
    apply_lr(opt, 0.5)
    assert {k: g["lr"] for k, g in by_name.items()} == {"embedding": 0.5, "unembedding": 1.0, "matrix": 1.5, "other": 1.5}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("frozen", ["embedding_lr", "unembedding_lr", "matrix_lr"])
def test_each_group_lr_controls_its_parameters(optimizer, frozen):
    model = tiny_model(VOCAB, 0)
    opt = build_optimizer(model, settings(name=optimizer, **{frozen: 0.0}))
    before = snapshot(model)
    one_step(model, opt)
    moved = changed(before, model)
    owner = {"embedding_lr": "embed_tokens", "unembedding_lr": "lm_head", "matrix_lr": "layers.0.self_attn.q_proj"}[frozen]
    for name, did_move in moved.items():
        if owner in name:
            assert not did_move, f"{name} moved although {frozen}=0"
    assert sum(moved.values()) > 0


def test_weight_decay_shrinks_weights_but_not_norms():
    for decay, expect_shrink in ((0.0, False), (0.1, True)):
        model = tiny_model(VOCAB, 0)
        opt = build_optimizer(model, settings(weight_decay=decay))
        before = snapshot(model)
        one_step(model, opt, zero_grads=True)  # zero gradient: only weight decay can move a weight
        q = "model.layers.0.self_attn.q_proj.weight"
        assert (model.get_parameter(q).norm() < before[q].norm()) == expect_shrink
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(model.get_parameter(norm), before[norm])  # "other" group: never decayed


def test_muon_uses_torch_muon_for_matrices_and_state_round_trips():
    model = tiny_model(VOCAB, 0)
    opt = build_optimizer(model, settings(name="muon"))
    assert isinstance(opt, MultiOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert [g["name"] for g in muon.param_groups] == ["matrix"]
    assert "matrix" not in [g["name"] for g in adamw.param_groups]
    one_step(model, opt)
    state = copy.deepcopy(opt.state_dict())  # load_state_dict aliases same-device tensors

    twin = tiny_model(VOCAB, 0)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, settings(name="muon"))
    twin_opt.load_state_dict(state)
    one_step(model, opt)
    one_step(twin, twin_opt)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name

    adam_model = tiny_model(VOCAB, 0)
    adam_opt = build_optimizer(adam_model, settings(name="adamw"))
    one_step(adam_model, adam_opt)
    fresh = tiny_model(VOCAB, 0)
    fresh_opt = build_optimizer(fresh, settings(name="muon"))
    one_step(fresh, fresh_opt)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(adam_model.get_parameter(q), fresh.get_parameter(q))  # the optimizer choice matters


def test_lr_schedule_shapes():
    total = 10
    linear = [lr_multiplier(s, total, settings(lr_schedule="linear")) for s in range(total)]
    assert linear[0] == 1.0 and linear[-1] == pytest.approx(0.1) and linear == sorted(linear, reverse=True)
    cosine = [lr_multiplier(s, total, settings(lr_schedule="cosine")) for s in range(total)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[1] > linear[1]  # cosine decays slower early
    assert [lr_multiplier(s, total, settings(lr_schedule="constant")) for s in range(total)] == [1.0] * total


def test_warmup_ratio_and_init_lr_frac():
    s = settings(lr_schedule="linear", warmup_ratio=0.2, init_lr_frac=0.5)
    values = [lr_multiplier(step, 10, s) for step in range(10)]
    assert values[:2] == [0.25, 0.5]  # 2 warmup steps up to init_lr_frac
    assert values[2] == 0.5  # decay starts from init_lr_frac
    assert values[-1] == pytest.approx(0.5 * (1 - 7 / 8))
    no_warmup = dataclasses.replace(s, warmup_ratio=0.0)
    assert lr_multiplier(0, 10, no_warmup) == 0.5
