"""Every validation rule of config.validate, one broken value at a time: the error names exactly that field.

Each case changes the valid offline config in one place (plus what the rule needs to be reachable) and expects the
problems to name the given field path and nothing unrelated, so a rule that is removed, or that fires on the wrong
field, fails its own case.
"""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path

import pytest

from integration_training.config import Config, ConfigError, DatasetSpec, validate

from helpers import replace_nested

REPO = Path(__file__).resolve().parents[1]


def base() -> Config:
    config = runpy.run_path(str(REPO / "configs" / "00_offline_cpu.py"))["config"]
    validate(config)
    return config


def changed(config: Config, **sections: dict) -> Config:
    return replace_nested(config, sections)


def spec(**fields) -> DatasetSpec:
    values = dict(name="arithmetic", split="train", subset=None, max_samples=4, repeat=1, path=None, reward=None)
    values.update(fields)
    return DatasetSpec(**values)


CUDA1 = dict(device_type="cuda", gpu_ranks=[0], processes_per_node=1)
TWO_CPU = dict(processes_per_node=2, parallelism="ddp")
TWO_RANK_BATCHES = dict(sft=dict(examples_per_step=8), rl=dict(batch_size=32))  # divisible over 2
# (id, section changes, the field path the problems must name (or a tuple: it, then others the change must cause))
CASES = [
    ("device_type", dict(target=dict(device_type="tpu")), "target.device_type"),
    ("parallelism_name", dict(target=dict(parallelism="zero3")), "target.parallelism"),
    ("master_port", dict(target=dict(master_port=0)), "target.master_port"),
    ("master_port_high", dict(target=dict(master_port=70000)), "target.master_port"),
    ("master_addr", dict(target=dict(master_addr="")), "target.master_addr"),
    ("node_rank", dict(target=dict(node_rank=1)), "target.node_rank"),
    ("node_rank_negative", dict(target=dict(node_rank=-1)), "target.node_rank"),
    ("gpu_ranks_on_cpu", dict(target=dict(gpu_ranks=[0])), "target.gpu_ranks"),
    ("cuda_without_gpus", dict(target=dict(CUDA1, gpu_ranks=[])), ("target.gpu_ranks", "target.processes_per_node")),
    ("cuda_duplicate_gpus", dict(target=dict(CUDA1, gpu_ranks=[1, 1], processes_per_node=2, parallelism="ddp"),
                                 **TWO_RANK_BATCHES), "target.gpu_ranks"),
    ("cuda_negative_gpu", dict(target=dict(CUDA1, gpu_ranks=[-1])), "target.gpu_ranks"),
    ("cuda_one_process_per_gpu", dict(target=dict(CUDA1, gpu_ranks=[0, 1])), "target.processes_per_node"),
    ("mps_single_process", dict(target=dict(device_type="mps", **TWO_CPU), **TWO_RANK_BATCHES),
     "target.processes_per_node"),
    ("several_processes_need_ddp", dict(target=dict(processes_per_node=2), **TWO_RANK_BATCHES), "target.parallelism"),
    ("one_process_must_use_none", dict(target=dict(parallelism="ddp")), "target.parallelism"),
    ("dtype_name", dict(model=dict(dtype="fp8")), "model.dtype"),
    ("float16_on_cpu", dict(model=dict(dtype="float16")), "model.dtype"),
    ("float16_with_fsdp2", dict(target=dict(CUDA1, gpu_ranks=[0, 1], processes_per_node=2, parallelism="fsdp2"),
                                model=dict(dtype="float16"), **TWO_RANK_BATCHES), "model.dtype"),
    ("attn_name", dict(model=dict(attn_implementation="flex")), "model.attn_implementation"),
    ("flash_attention_on_cpu", dict(model=dict(attn_implementation="flash_attention_2")), "model.attn_implementation"),
    ("model_name_empty", dict(model=dict(name="")), "model.name"),
    ("max_length", dict(data=dict(max_length=8)),
     ("data.max_length", "rl.sampling.max_new_tokens", "evaluation.sampling.max_new_tokens")),
    ("unknown_tool", dict(data=dict(tools=["python"])), "data.tools"),
    ("tool_twice", dict(data=dict(tools=["calculator", "calculator"])), "data.tools"),
    ("spec_name", dict(data=dict(rl_mixture=[spec(name="")])), "data.rl_mixture[0].name"),
    ("spec_split", dict(data=dict(rl_mixture=[spec(split="")])), "data.rl_mixture[0].split"),
    ("spec_max_samples", dict(data=dict(sft_val_mixture=[spec(max_samples=0)])), "data.sft_val_mixture[0].max_samples"),
    ("spec_repeat", dict(evaluation=dict(mixture=[spec(repeat=0)])), "evaluation.mixture[0].repeat"),
    ("spec_reward", dict(data=dict(sft_mixture=[spec(reward="module.function")])), "data.sft_mixture[0].reward"),
    ("sft_mixture_needed", dict(data=dict(sft_mixture=[])), "data.sft_mixture"),
    ("sft_val_mixture_needed", dict(data=dict(sft_val_mixture=[])), "data.sft_val_mixture"),
    ("rl_mixture_needed", dict(data=dict(rl_mixture=[])), "data.rl_mixture"),
    ("eval_mixture_needed", dict(evaluation=dict(mixture=[])), "evaluation.mixture"),
    ("eval_mixture_needed_by_every_rl_steps", dict(evaluation=dict(
        mixture=[], at_start=False, after_sft=False, after_rl=False, every_rl_steps=2)), "evaluation.mixture"),
    ("eval_after_sft_needs_sft", dict(output=dict(mode="rl", source_checkpoint="/tmp/x")), "evaluation.after_sft"),
    ("eval_after_rl_needs_rl", dict(output=dict(mode="sft")), "evaluation.after_rl"),
    ("eval_every_rl_steps_needs_rl", dict(output=dict(mode="sft"), evaluation=dict(after_rl=False, every_rl_steps=3)),
     "evaluation.every_rl_steps"),
    ("eval_every_rl_steps_negative", dict(evaluation=dict(every_rl_steps=-1)), "evaluation.every_rl_steps"),
    ("eval_num_problems", dict(evaluation=dict(num_problems=0)), "evaluation.num_problems"),
    ("eval_num_samples", dict(evaluation=dict(num_samples=0)), "evaluation.num_samples"),
    ("sft_batch_size", dict(sft=dict(batch_size=0)), "sft.batch_size"),
    ("sft_examples_per_step", dict(sft=dict(examples_per_step=0)), "sft.examples_per_step"),
    ("sft_accumulation_divisible", dict(sft=dict(examples_per_step=6)), "sft.examples_per_step"),
    ("sft_eval_steps", dict(sft=dict(eval_steps=0)), "sft.eval_steps"),
    ("sft_eval_every", dict(sft=dict(eval_every=0)), "sft.eval_every"),
    *[(f"{stage}_{field}", {stage: {field: value}}, f"{stage}.{field}") for stage in ("sft", "rl") for field, value in [
        ("num_epochs", 0), ("num_iterations", 0), ("num_iterations", -2), ("log_every", 0), ("checkpoint_every", 0)]],
    *[(f"{stage}_optimizer_{field}", {stage: {"optimizer": {field: value}}}, f"{stage}.optimizer.{field}")
      for stage in ("sft", "rl") for field, value in [
        ("name", "sgd"), ("lr_schedule", "step"), ("embedding_lr", -1e-3), ("unembedding_lr", -1e-3),
        ("matrix_lr", -1e-3), ("weight_decay", -0.1), ("grad_clip", -1.0), ("init_lr_frac", 0.0),
        ("init_lr_frac", 1.5), ("warmup_ratio", 1.0), ("warmup_ratio", -0.1)]],
    *[(f"{section}_sampling_{field}", {section: {"sampling": {field: value}}}, f"{section}.sampling.{field}")
      for section in ("rl", "evaluation") for field, value in [
        ("batch_size", 0), ("max_new_tokens", 0), ("max_new_tokens", 250), ("temperature", -0.5),
        ("temperature", 0.0), ("top_k", -1)]],
    ("rl_advantage", dict(rl=dict(advantage="median")), "rl.advantage"),
    ("rl_examples_per_step", dict(rl=dict(examples_per_step=0)), "rl.examples_per_step"),
    ("rl_num_samples", dict(rl=dict(num_samples=1, batch_size=8)), "rl.num_samples"),
    ("rl_batch_size", dict(rl=dict(batch_size=0)), "rl.batch_size"),
    ("rl_batch_size_divides", dict(rl=dict(batch_size=7)), "rl.batch_size"),
    ("rl_updates_per_batch", dict(rl=dict(updates_per_batch=0)), "rl.updates_per_batch"),
    ("rl_kl_coef", dict(rl=dict(kl_coef=-0.1)), "rl.kl_coef"),
    ("rl_clip_eps", dict(rl=dict(clip_eps=0.0)), "rl.clip_eps"),
    ("rl_prompts_split_over_ranks", dict(target=TWO_CPU, rl=dict(examples_per_step=7, batch_size=8),
                                         sft=dict(examples_per_step=8)), "rl.examples_per_step"),
    ("mode", dict(output=dict(mode="dpo")), "output.mode"),
    ("log_level", dict(output=dict(log_level="LOUD")), "output.log_level"),
    ("experiment_name_slash", dict(output=dict(experiment_name="a/b")), "output.experiment_name"),
    ("experiment_name_dots", dict(output=dict(experiment_name="..")), "output.experiment_name"),
    ("experiment_name_empty", dict(output=dict(experiment_name="")), "output.experiment_name"),
    ("wandb_project_needed", dict(output=dict(use_wandb=True, wandb_project="")), "output.wandb_project"),
    ("rl_needs_source", dict(output=dict(mode="rl"), evaluation=dict(after_sft=False)), "output.source_checkpoint"),
    ("sft_takes_no_source", dict(output=dict(mode="sft", source_checkpoint="/tmp/x"), evaluation=dict(after_rl=False)),
     "output.source_checkpoint"),
    ("types", dict(sft=dict(batch_size=True)), "sft.batch_size"),
]


@pytest.mark.parametrize("changes,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule_names_exactly_its_field(changes, field):
    with pytest.raises(ConfigError) as caught:
        validate(changed(base(), **changes))
    problems = caught.value.problems
    fields = (field,) if isinstance(field, str) else field
    assert any(p.startswith(fields[0] + ":") for p in problems), problems
    assert all(any(p.startswith(f + ":") for f in fields) for p in problems), problems


@pytest.mark.parametrize("field", ["processes_per_node", "num_nodes"])
def test_zero_processes_is_a_config_error(field):
    with pytest.raises(ConfigError) as caught:
        validate(changed(base(), target={field: 0}))
    assert any(p.startswith(f"target.{field}") for p in caught.value.problems)
