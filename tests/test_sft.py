"""SFT: loss definition, accumulation, every SFTConfig field, overfitting, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import arithmetic, make_config, optimization, smollm2_tokenizer, tiny_model
from integration_training import distributed
from integration_training import template
from integration_training.template import IGNORE_INDEX, Rendered
from integration_training.config import DatasetSpec
from integration_training.data import build_mixture
from integration_training.errors import TrainingDiverged, UserError
from integration_training.metrics import read_metrics
from integration_training.optim import build_optimizer
from integration_training.sft import (
    SFTStream,
    SupervisedTokenLoss,
    gradient_accumulation,
    rank_micro_batches,
    run_sft,
    total_steps,
    train_step,
    validation_batches,
)
from integration_training.signals import StopRequest

SINGLE = distributed.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)


@pytest.fixture(scope="module")
def rendered():
    tokenizer = smollm2_tokenizer()
    examples = build_mixture([arithmetic("train", 16)], seed=0).examples
    kept, report = template.render_examples(tokenizer, examples, 256)
    assert report.dropped == 0
    return kept


def vocab() -> int:
    return len(smollm2_tokenizer())


def reference_loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """The textbook computation: full logits, shift by one, mask, sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    targets = batch.labels  # pre-shifted: labels[t] is the target of position t
    keep = targets != -100
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), int(keep.sum())


def test_loss_equals_hand_computation_from_full_logits(rendered):
    model = tiny_model(vocab(), 0)
    batch = template.collate_padded(rendered[:3], smollm2_tokenizer().pad_token_id)
    # Shift by hand from input_ids + loss mask, independently of template.shifted_labels.
    for b, r in enumerate(rendered[:3]):
        for t in range(len(r) - 1):
            expected = r.input_ids[t + 1] if r.loss_mask[t + 1] else -100
            assert int(batch.labels[b, t]) == expected
    gathered = SupervisedTokenLoss(model, "float32", True)(batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids)
    full, count = reference_loss_sum(model, batch)
    assert count == sum(sum(r.loss_mask[1:]) for r in rendered[:3])
    torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-4)


def test_packed_rows_isolate_conversations(rendered):
    """A packed row (4-D block mask, restarted positions) gives the same loss as the conversations alone."""
    model = tiny_model(vocab(), 0)
    pad = smollm2_tokenizer().pad_token_id
    loss = SupervisedTokenLoss(model, "float32", True)
    packed = template.collate_packed([rendered[:3]], 300, pad, "sdpa")
    assert packed.attention_mask.shape == (1, 1, 300, 300)
    alone = sum(loss(*dataclasses.astuple(template.collate_padded([r], pad))) for r in rendered[:3])
    together = loss(packed.input_ids, packed.labels, packed.attention_mask, packed.position_ids)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-3)


def grads_after(model, micro_batches, grad_clip=0.0):
    """Run train_step with lr 0 on a copy of the optimizer state and return the loss and the gradients it used."""
    captured = {}

    class Capture:  # stands in for the optimizer: records gradients at step time
        param_groups = [{"params": list(model.parameters()), "base_lr": 0.0, "lr": 0.0}]

        def step(self):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    module = SupervisedTokenLoss(model, "float32", True)
    tokens = sum(len(b.input_ids.flatten()) for b in micro_batches)
    result = train_step(module, optimization(Capture(), grad_clip), micro_batches, tokens=tokens, lr_multiplier=1.0)
    return result, captured


def test_token_normalisation_spans_the_whole_accumulated_step(rendered):
    pad = smollm2_tokenizer().pad_token_id
    model = tiny_model(vocab(), 0)
    micro = [template.collate_padded(rendered[i : i + 2], pad) for i in (0, 2)]
    result, grads = grads_after(model, micro)
    sums_counts = [reference_loss_sum(model, b) for b in micro]
    total = sum(c for _, c in sums_counts)
    expected = sum(s for s, _ in sums_counts) / total  # not the mean of per-micro-batch means
    assert result.supervised_tokens == total
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)
    model.zero_grad()
    expected.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)


def test_fully_masked_micro_batch_is_finite_and_contributes_nothing(rendered):
    pad = smollm2_tokenizer().pad_token_id
    model = tiny_model(vocab(), 0)
    real = template.collate_padded(rendered[:2], pad)
    masked = dataclasses.replace(real, labels=torch.full_like(real.labels, -100))
    only_masked, _ = grads_after(model, [masked])
    assert only_masked.loss == 0.0 and only_masked.supervised_tokens == 0
    both, grads_both = grads_after(model, [real, masked])
    alone, grads_alone = grads_after(model, [real])
    assert both.loss == pytest.approx(alone.loss)
    for name in grads_alone:
        torch.testing.assert_close(grads_both[name], grads_alone[name])


def test_accumulation_matches_one_big_micro_batch(rendered):
    """micro-batch 2 × accumulation 4 gives the same gradient (hence update) as micro-batch 8 × 1.

    Gradients and the pre-clip norm are compared, not weights after an AdamW step: Adam's first update is
    ~lr·sign(g), blind to a gradient scaled by 1/accumulation."""
    pad = smollm2_tokenizer().pad_token_id
    stage = make_stage(batch_size=2, examples_per_step=8)
    sequences = [[r] for r in rendered[:8]]
    assert gradient_accumulation(stage, 1) == 4
    small = rank_micro_batches(sequences, 2, SINGLE, packing=False, pad_id=pad, attn_implementation="sdpa")
    big = rank_micro_batches(sequences, 8, SINGLE, packing=False, pad_id=pad, attn_implementation="sdpa")
    assert len(small) == 4 and len(big) == 1
    (small_result, small_grads), (big_result, big_grads) = (grads_after(tiny_model(vocab(), 0), m) for m in (small, big))
    assert small_result.supervised_tokens == big_result.supervised_tokens > 0
    assert small_result.loss == pytest.approx(big_result.loss, rel=1e-5)
    assert small_result.grad_norm == pytest.approx(big_result.grad_norm, rel=1e-4)
    for name, grad in big_grads.items():
        torch.testing.assert_close(small_grads[name], grad, rtol=1e-4, atol=1e-7)
    # And the optimizer applies it: one real AdamW step from either gives the same weights.
    updated = []
    for micro in (small, big):
        model = tiny_model(vocab(), 0)
        opt = build_optimizer(model, stage.optimizer)
        train_step(SupervisedTokenLoss(model, "float32", True).train(), optimization(opt, 1.0), micro, tokens=0,
                   lr_multiplier=1.0)
        updated.append(dict(model.named_parameters()))
    for name, p in updated[0].items():
        torch.testing.assert_close(p, updated[1][name], rtol=0, atol=1e-4)


def make_stage(**fields):
    """An SFTConfig (AdamW 1e-2, no clipping); `fields` override, nested dicts for the optimizer."""
    from helpers import optimizer_config, replace_nested
    from integration_training.config import SFTConfig

    return replace_nested(SFTConfig(
        num_epochs=1, num_iterations=10, batch_size=1, examples_per_step=1,
        optimizer=optimizer_config(lr=1e-2, grad_clip=0.0), packing=False, eval_every=1, eval_steps=1,
        checkpoint_every=1, log_every=1,
    ), fields)


def test_grad_clip_reports_unclipped_norm_and_clips(rendered):
    pad = smollm2_tokenizer().pad_token_id
    micro = [template.collate_padded(rendered[:2], pad)]
    unclipped, grads = grads_after(tiny_model(vocab(), 0), micro, grad_clip=0.0)
    clipped, clipped_grads = grads_after(tiny_model(vocab(), 0), micro, grad_clip=0.1)
    assert unclipped.grad_norm == pytest.approx(clipped.grad_norm) and unclipped.grad_norm > 0.1  # reported pre-clip
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped_grads.values()]))
    assert float(norm) == pytest.approx(0.1, rel=1e-3)
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))) == pytest.approx(unclipped.grad_norm, rel=1e-4)


# ---------------------------------------------------------------- data stream fields


def test_epochs_iterations_batch_and_packing_shape_the_stream(rendered):
    stage = make_stage(num_epochs=2, num_iterations=-1, batch_size=2, examples_per_step=4)
    stream = SFTStream(list(rendered), seed=0, packing=False, max_length=256, sequences_per_step=4)
    assert stream.steps_in_epoch(0) == 4 and total_steps(stage, stream) == 8  # num_epochs × 16/4
    assert total_steps(dataclasses.replace(stage, num_epochs=3), stream) == 12
    assert total_steps(dataclasses.replace(stage, num_iterations=5), stream) == 5  # explicit wins
    assert stream.locate(5) == (1, 1)
    # Each epoch sees every conversation once, in a different seeded order; order is a pure function of (seed, epoch).
    epoch0 = [id(s[0]) for step in range(4) for s in stream.step_sequences(step)]
    epoch1 = [id(s[0]) for step in range(4, 8) for s in stream.step_sequences(step)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(map(id, rendered)) and epoch0 != epoch1
    again = SFTStream(list(rendered), seed=0, packing=False, max_length=256, sequences_per_step=4)
    assert [id(s[0]) for s in again.step_sequences(6)] == [id(s[0]) for s in stream.step_sequences(6)]

    packed = SFTStream(list(rendered), seed=0, packing=True, max_length=256, sequences_per_step=2)
    rows = packed.rows(0)
    assert all(sum(len(r) for r in row) <= 256 for row in rows) and max(len(row) for row in rows) >= 2
    assert packed.steps_in_epoch(0) == len(rows) // 2 < 16 // 2  # a packed row holds several conversations
    batch = rank_micro_batches(packed.step_sequences(0), 2, SINGLE, packing=True, pad_id=0, attn_implementation="sdpa")[0]
    assert batch.attention_mask.ndim == 4 and batch.input_ids.shape[0] == 2


def test_ranks_get_disjoint_equal_shards(rendered):
    sequences = [[r] for r in rendered[:8]]
    seen = []
    for rank in range(2):
        dist = dataclasses.replace(SINGLE, rank=rank, world_size=2, is_main=rank == 0)
        micro = rank_micro_batches(sequences, 2, dist, packing=False, pad_id=0, attn_implementation="sdpa")
        assert len(micro) == 2
        seen += [tuple(row[row != 0].tolist()) for b in micro for row in b.input_ids]
    assert len(set(seen)) == 8
    assert distributed.shard(list(range(7)), dataclasses.replace(SINGLE, rank=1, world_size=2)) == [1, 3, 5]


def test_single_process_distributed_is_a_no_op(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    target = make_config(tmp_path).target
    dist = distributed.init_distributed(target)
    assert (dist.rank, dist.world_size, dist.is_main, dist.device.type) == (0, 1, True, "cpu")
    module = SupervisedTokenLoss(tiny_model(61, 0), "float32", True)
    assert distributed.wrap_model(module, target, dist, "float32") is module
    assert distributed.any_rank(True, dist) and not distributed.any_rank(False, dist)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="WORLD_SIZE=2"):
        distributed.init_distributed(target)


def test_check_port_free_refuses_a_listening_port():
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(UserError, match="master_port"):
            distributed.check_port_free("127.0.0.1", port)
    distributed.check_port_free("127.0.0.1", port)  # free again once closed


def test_eval_steps_limits_validation_batches(rendered):
    for eval_steps in (1, 3):
        stage = make_stage(batch_size=2, eval_steps=eval_steps)
        assert len(validation_batches(rendered, stage, 256, SINGLE, 0, "sdpa")) == eval_steps


# ---------------------------------------------------------------- whole runs


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / "model.safetensors"))


def test_run_logs_evaluates_and_checkpoints_on_schedule(tmp_path):
    config = make_config(
        tmp_path,
        sft=dict(num_iterations=5, eval_every=2, checkpoint_every=2, log_every=2,
                 optimizer=dict(warmup_ratio=0.4, lr_schedule="linear", init_lr_frac=0.5, matrix_lr=1e-3)),
    )
    run_dir = tmp_path / "run"
    final = run_sft(config, run_dir, resume=False)
    assert final.name == "step_000005"
    assert sorted(p.name for p in (run_dir / "checkpoints" / "sft").iterdir()) == ["step_000002", "step_000004", "step_000005"]
    rows = read_metrics(run_dir, "sft")
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 5]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]
    # warmup 2 steps to 0.5, then linear decay over the remaining 3: multipliers at steps 2, 4, 5 (0-based 1, 3, 4)
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([1e-3 * 0.5, 1e-3 * 0.5 * (2 / 3), 1e-3 * 0.5 * (1 / 3)])
    for r in rows[1:]:
        assert {"loss", "lr", "grad_norm", "supervised_tokens", "tokens_per_s"} <= r.keys() and r["supervised_tokens"] > 0
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_examples_per_step_scales_supervised_tokens(tmp_path):
    counts = {}
    for target in (2, 4):
        config = make_config(tmp_path, sft=dict(num_iterations=1, examples_per_step=target),
                             output=dict(experiment_name=f"t{target}"))
        run_sft(config, tmp_path / f"t{target}", resume=False)
        counts[target] = read_metrics(tmp_path / f"t{target}", "sft")[-1]["supervised_tokens"]
    assert counts[4] > 1.5 * counts[2]


def test_overfits_eight_conversations_and_checkpoint_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(
        tmp_path,
        data=dict(sft_mixture=[arithmetic("train", 8)], sft_val_mixture=[arithmetic("train", 8)]),
        # Muon memorises ~3x faster than AdamW here (measured: loss 0.05 at step 30 vs 1.25 at step 50 with AdamW).
        sft=dict(num_iterations=45, batch_size=8, examples_per_step=8, eval_every=1000, log_every=15,
                 optimizer=dict(name="muon", embedding_lr=3e-2, unembedding_lr=3e-2, matrix_lr=3e-2,
                                lr_schedule="linear", grad_clip=1.0)),
    )
    final = run_sft(config, tmp_path / "run", resume=False)
    rows = read_metrics(tmp_path / "run", "sft")
    assert rows[-1]["loss"] < 0.05 and rows[-1]["val_loss"] < 0.05, rows[-1]

    model = AutoModelForCausalLM.from_pretrained(str(final))
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    example = build_mixture([arithmetic("train", 8)], seed=0).examples[0]
    prompt = torch.tensor([template.render_prompt(tokenizer, example.messages[:-1])])
    out = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=list(template.stop_token_ids(tokenizer)))
    text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert text.strip() == example.messages[-1]["content"].strip()  # memorised answer


def resumable_config(tmp_path, name, **sft):
    fields = dict(num_iterations=4, checkpoint_every=2, eval_every=2, log_every=1, packing=True, batch_size=1,
                  examples_per_step=2,
                  optimizer=dict(name="muon", lr_schedule="cosine", warmup_ratio=0.25, weight_decay=0.01))
    fields.update(sft)
    return make_config(tmp_path, sft=fields, output=dict(experiment_name=name))


def test_resume_after_stop_or_crash_is_bitwise_identical(tmp_path):
    full = run_sft(resumable_config(tmp_path, "full"), tmp_path / "full", resume=False)
    reference = weights(full)
    expected_rows = read_metrics(tmp_path / "full", "sft")

    # 1) SIGTERM during step 1 → checkpoint at the step boundary, return; resume finishes the run.
    stop = StopRequest()
    stopped_dir = tmp_path / "stopped"
    config = resumable_config(tmp_path, "stopped")
    first = run_sft(config, stopped_dir, resume=False, stop=stop,
                    after_step=lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 1 else None)
    assert stop.requested and stop.reason == "SIGTERM" and first.name == "step_000001"
    final = run_sft(config, stopped_dir, resume=True)
    assert final.name == "step_000004"

    # 2) A crash after step 3 (last checkpoint: step 2) → resume re-does step 3 and drops its old metric line.
    crashed_dir = tmp_path / "crashed"
    config = resumable_config(tmp_path, "crashed")

    def crash(step):
        if step == 3:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        run_sft(config, crashed_dir, resume=False, after_step=crash)
    assert [r["step"] for r in read_metrics(crashed_dir, "sft")] == [0, 1, 2, 3]
    crashed_final = run_sft(config, crashed_dir, resume=True)

    for run_dir, final_dir in ((stopped_dir, final), (crashed_dir, crashed_final)):
        resumed = weights(final_dir)
        assert resumed.keys() == reference.keys()
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), f"{run_dir.name}: {name} differs"
        rows = read_metrics(run_dir, "sft")
        assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # no gaps, no duplicates
        for got, want in zip(rows, expected_rows):
            assert got["loss" if "loss" in want else "val_loss"] == want["loss" if "loss" in want else "val_loss"]


def test_existing_checkpoints_need_resume(tmp_path):
    config = make_config(tmp_path, sft=dict(num_iterations=1))
    run_sft(config, tmp_path / "run", resume=False)
    with pytest.raises(UserError, match="--resume"):
        run_sft(config, tmp_path / "run", resume=False)
    assert run_sft(config, tmp_path / "run", resume=True).name == "step_000001"  # already complete: no new steps


def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    config = make_config(tmp_path, sft=dict(num_iterations=4, checkpoint_every=2))
    holder = {}

    def poison(step):  # runs before that step's checkpoint: poison after step 3, so step 4 diverges
        if step == 3:
            with torch.no_grad():
                holder["model"].lm_head.weight.fill_(float("nan"))

    import integration_training.sft as sft_module

    original = sft_module.SupervisedTokenLoss.__init__

    def remember(self, model, *args):
        original(self, model, *args)
        holder["model"] = model

    sft_module.SupervisedTokenLoss.__init__ = remember
    try:
        with pytest.raises(TrainingDiverged, match="step 4") as info:
            run_sft(config, tmp_path / "run", resume=False, after_step=poison)
    finally:
        sft_module.SupervisedTokenLoss.__init__ = original
    assert info.value.step == 4 and info.value.last_checkpoint.name == "step_000002"
    saved = weights(info.value.last_checkpoint)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert [p.name for p in (tmp_path / "run" / "checkpoints" / "sft").iterdir()] == ["step_000002"]


SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.slow  # ~2 minutes on 2 loaded cores: a 135M model, 20 steps
def test_smollm2_on_gsm8k_lowers_validation_loss(tmp_path):
    """The real SmolLM2 learns: on GSM8K rows when ../shared/data has them, else on procedural arithmetic (so the
    test runs on a fresh clone too)."""
    from integration_training.models import OFFLINE_SMOLLM2

    def gsm8k(split, n):
        if not (SHARED_GSM8K / "train.jsonl").is_file():
            return arithmetic(split, n)
        return DatasetSpec(name="openai/gsm8k", split=split, subset="main", max_samples=n, repeat=1,
                           path=str(SHARED_GSM8K / f"{split}.jsonl"), reward=None)

    config = make_config(
        tmp_path,
        model=dict(name=OFFLINE_SMOLLM2),
        data=dict(sft_mixture=[gsm8k("train", 40)], sft_val_mixture=[gsm8k("test", 8)], max_length=256),
        sft=dict(num_iterations=20, batch_size=1, examples_per_step=1, eval_every=1000, eval_steps=6, packing=False,
                 optimizer=dict(embedding_lr=5e-5, unembedding_lr=5e-5, matrix_lr=5e-5, warmup_ratio=0.0,
                                lr_schedule="linear")),
    )
    run_sft(config, tmp_path / "run", resume=False)
    rows = read_metrics(tmp_path / "run", "sft")
    assert rows[-1]["step"] == 20
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.02, (rows[0]["val_loss"], rows[-1]["val_loss"])


def _granite(scaling: float):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=scaling)
    return GraniteForCausalLM(config).float()


@pytest.mark.parametrize("make,exact", [(lambda: tiny_model(61, 0), True), (lambda: _granite(4.0), False),
                                        (lambda: _granite(1.0), True)])
def test_lm_head_shortcut_is_checked_against_the_models_own_logits(make, exact):
    """Granite divides its logits by `logits_scaling`, a name the static check does not know: the start-up check
    finds the shortcut wrong, and the loss then uses the model's own logits (equal to HF's own loss)."""
    from integration_training.sft import lm_head_shortcut_exact

    model = make()
    rows = [Rendered(input_ids=[(5 * i + 3 * j) % 61 for j in range(10)], loss_mask=[0] * 3 + [1] * 7) for i in range(3)]
    batch = template.collate_padded(rows, 0)
    assert lm_head_shortcut_exact(model, batch, "float32") is exact
    ours = SupervisedTokenLoss(model, "float32", exact)(batch.input_ids, batch.labels, batch.attention_mask,
                                                        batch.position_ids)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    supervised = batch.labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[supervised], batch.labels[supervised], reduction="sum")
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
