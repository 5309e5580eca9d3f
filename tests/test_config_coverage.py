"""Every config field has a test that shows its effect: a new field without one fails here, naming what to add.

FIELD_TESTS maps each schema field ("ClassName.field", for every dataclass reachable from `Config`) to the tests
that fail when the field's effect is removed (not merely tests that set it). Validation rules have their own table
in tests/test_validation_rules.py.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from integration_training.config import Config

TESTS = Path(__file__).resolve().parent

E2E = "test_end_to_end.py::test_deploy_sft_then_rl_leaves_every_artefact_and_hands_sft_weights_to_rl"
E2E_RL = "test_end_to_end.py::test_deploy_mode_rl_starts_from_source_checkpoint"
E2E_SFT = "test_end_to_end.py::test_deploy_sft_only_ends_with_the_baseline_and_after_sft_table"
EVAL_FLAGS = "test_end_to_end.py::test_evaluations_run_only_where_the_evaluation_section_asks"
KNOBS = "test_effects.py::test_model_and_output_fields_reach_both_stages_of_a_run"
RL_RUN = "test_effects.py::test_rl_run_takes_every_rl_field_from_the_rl_section"
TORCHRUN = "test_cli.py::test_torchrun_command_carries_the_rendezvous"
TWO_NODES = "test_distributed.py::test_two_nodes_on_localhost_train_and_write_one_checkpoint"
EQUIVALENCE = "test_distributed.py::test_ddp_and_fsdp2_updates_equal_one_process_with_the_same_global_batch"
SFT_STREAM = "test_sft.py::test_epochs_iterations_batch_and_packing_shape_the_stream"
SFT_SCHEDULE = "test_sft.py::test_run_logs_evaluates_and_checkpoints_on_schedule"
GROUP_LRS = "test_optim.py::test_each_group_lr_controls_its_parameters"
WARMUP = "test_optim.py::test_warmup_ratio_and_init_lr_frac"
DEVICE = "test_effects.py::test_device_type_decides_where_a_deploy_run_loads_the_model"
SFT_DATA = "test_effects.py::test_dataset_specs_and_shuffle_seed_decide_what_sft_trains_on"
RL_ROWS = "test_effects.py::test_rl_rows_carry_the_custom_reward_the_advantage_kind_and_the_seeded_prompt_order"

FIELD_TESTS: dict[str, list[str]] = {
    "TargetConfig.gpu_ranks": ["test_effects.py::test_gpu_ranks_become_cuda_visible_devices"],
    "TargetConfig.device_type": [DEVICE, "test_cli.py::test_real_run_of_cuda_config_without_gpu_exits_2_before_loading"],
    "TargetConfig.processes_per_node": [TORCHRUN, EQUIVALENCE],
    "TargetConfig.parallelism": [EQUIVALENCE,
                                 "test_distributed.py::test_resuming_with_another_world_size_or_parallelism_is_a_user_error"],
    "TargetConfig.num_nodes": [TORCHRUN, TWO_NODES],
    "TargetConfig.node_rank": [TORCHRUN, TWO_NODES],
    "TargetConfig.master_addr": [TORCHRUN, TWO_NODES],
    "TargetConfig.master_port": [TORCHRUN, "test_distributed.py::test_master_port_in_use_is_a_user_error"],
    "ModelConfig.name": [E2E, "test_models.py::test_hub_ids_pass_through_and_are_described_without_network"],
    "ModelConfig.dtype": ["test_effects.py::test_model_dtype_and_attention_reach_the_loaded_model", KNOBS],
    "ModelConfig.compile": [KNOBS],
    "ModelConfig.attn_implementation": ["test_effects.py::test_model_dtype_and_attention_reach_the_loaded_model", KNOBS],
    "ModelConfig.gradient_checkpointing": [KNOBS],
    "ModelConfig.lora": ["test_lora.py::test_sft_steps_change_only_adapter_tensors",
                         "test_lora.py::test_deploy_sft_then_rl_with_lora_writes_adapters_merged_exports_and_resumes_bitwise"],
    "LoRAConfig.r": ["test_lora.py::test_rank_alpha_and_dropout_reach_every_adapted_layer"],
    "LoRAConfig.alpha": ["test_lora.py::test_rank_alpha_and_dropout_reach_every_adapted_layer"],
    "LoRAConfig.dropout": ["test_lora.py::test_rank_alpha_and_dropout_reach_every_adapted_layer"],
    "LoRAConfig.target_modules": ["test_lora.py::test_named_targets_adapt_exactly_the_matching_linear_layers",
                                  "test_lora.py::test_all_linear_adapts_every_linear_layer_but_the_lm_head"],
    "DatasetSpec.name": [SFT_DATA, "test_data.py::test_unknown_name_lists_supported_names",
                         "test_data.py::test_arithmetic_format_and_train_test_never_overlap"],
    "DatasetSpec.split": [SFT_DATA, "test_data.py::test_arithmetic_format_and_train_test_never_overlap"],
    "DatasetSpec.subset": [SFT_DATA, "test_data.py::test_arc_adapter"],
    "DatasetSpec.max_samples": [SFT_DATA, "test_data.py::test_mixture_seeded_order_and_sample"],
    "DatasetSpec.repeat": [SFT_DATA, "test_data.py::test_mixture_counts_and_report"],
    "DatasetSpec.path": [SFT_DATA, "test_data.py::test_custom_json_forms_and_reference"],
    "DatasetSpec.reward": [RL_ROWS, "test_rl.py::test_learning_signal_reward_rises"],
    "DataConfig.sft_mixture": ["test_sft.py::test_overfits_eight_conversations_and_checkpoint_generates"],
    "DataConfig.sft_val_mixture": ["test_sft.py::test_overfits_eight_conversations_and_checkpoint_generates"],
    "DataConfig.rl_mixture": ["test_rl.py::test_learning_signal_reward_rises"],
    "DataConfig.max_length": ["test_template.py::test_render_examples_reports_over_long_per_source",
                              "test_effects.py::test_rl_max_length_drops_prompts_over_the_budget_and_keeps_the_boundary"],
    "DataConfig.tools": ["test_tool_use.py::test_sft_rl_and_eval_run_with_the_calculator",
                         "test_tool_use.py::test_prepared_sft_data_renders_with_the_tools",
                         "test_tool_use.py::test_gsm8k_keeps_annotations_only_with_the_calculator"],
    "DataConfig.shuffle_seed": [SFT_DATA, RL_ROWS, "test_data.py::test_mixture_seeded_order_and_sample",
                                "test_rl.py::test_total_steps_and_prompt_order"],
    "SFTConfig.num_epochs": [SFT_STREAM],
    "SFTConfig.num_iterations": [SFT_STREAM],
    "SFTConfig.batch_size": [SFT_STREAM],
    "SFTConfig.examples_per_step": ["test_sft.py::test_examples_per_step_scales_supervised_tokens",
                                    "test_sft.py::test_accumulation_matches_one_big_micro_batch"],
    "SFTConfig.optimizer": [SFT_SCHEDULE, RL_RUN, KNOBS],  # each stage builds its optimizer from its own section
    "SFTConfig.packing": [SFT_STREAM, "test_sft.py::test_packed_rows_isolate_conversations"],
    "SFTConfig.eval_every": [SFT_SCHEDULE, KNOBS],
    "SFTConfig.eval_steps": ["test_sft.py::test_eval_steps_limits_validation_batches"],
    "SFTConfig.checkpoint_every": [SFT_SCHEDULE],
    "SFTConfig.log_every": [SFT_SCHEDULE, KNOBS],
    # OptimizerConfig serves sft.optimizer and rl.optimizer: unit tests of each field, plus RL_RUN / SFT_SCHEDULE
    # showing that each stage's run takes them from its own section.
    "OptimizerConfig.name": [KNOBS, "test_optim.py::test_muon_uses_torch_muon_for_matrices_and_state_round_trips"],
    "OptimizerConfig.embedding_lr": [GROUP_LRS, RL_RUN],
    "OptimizerConfig.unembedding_lr": [GROUP_LRS, RL_RUN],
    "OptimizerConfig.matrix_lr": [GROUP_LRS, RL_RUN],
    "OptimizerConfig.weight_decay": ["test_optim.py::test_weight_decay_shrinks_weights_but_not_norms", RL_RUN],
    "OptimizerConfig.init_lr_frac": [WARMUP, SFT_SCHEDULE, RL_RUN],
    "OptimizerConfig.warmup_ratio": [WARMUP, SFT_SCHEDULE, RL_RUN],
    "OptimizerConfig.lr_schedule": ["test_optim.py::test_lr_schedule_shapes", SFT_SCHEDULE, RL_RUN],
    "OptimizerConfig.grad_clip": ["test_sft.py::test_grad_clip_reports_unclipped_norm_and_clips",
                                  "test_effects.py::test_rl_grad_clip_bounds_the_applied_gradient_and_reports_the_unclipped_norm"],
    # SamplingConfig serves rl.sampling (rollouts) and evaluation.sampling: RL_RUN gives the two different values.
    "SamplingConfig.batch_size": ["test_rl.py::test_sample_batch_size_sets_the_sampling_chunks_of_rollouts_and_evaluation",
                                  RL_RUN],
    "SamplingConfig.max_new_tokens": [RL_RUN, "test_rollout.py::test_max_new_tokens_and_empty"],
    "SamplingConfig.temperature": [RL_RUN, "test_effects.py::test_temperature_and_top_k_shape_what_is_drawn"],
    "SamplingConfig.top_k": [RL_RUN, "test_effects.py::test_temperature_and_top_k_shape_what_is_drawn"],
    "RLConfig.num_epochs": ["test_rl.py::test_total_steps_and_prompt_order"],
    "RLConfig.num_iterations": ["test_rl.py::test_total_steps_and_prompt_order", RL_RUN],
    "RLConfig.examples_per_step": [RL_RUN],
    "RLConfig.num_samples": [RL_RUN],
    "RLConfig.batch_size": ["test_rl.py::test_token_level_normalisation_across_micro_batches"],
    "RLConfig.sampling": [RL_RUN],
    "RLConfig.optimizer": [RL_RUN, KNOBS],
    "RLConfig.advantage": [RL_ROWS, "test_rl.py::test_mean_std_advantage_by_hand"],
    "RLConfig.kl_coef": ["test_effects.py::test_kl_is_zero_against_itself_and_grows_with_divergence",
                         "test_effects.py::test_kl_coef_adds_the_gradient_of_the_penalty"],
    "RLConfig.clip_eps": ["test_effects.py::test_clip_fraction_is_zero_inside_the_band_and_positive_outside"],
    "RLConfig.updates_per_batch": ["test_effects.py::test_clip_fraction_is_zero_inside_the_band_and_positive_outside"],
    "RLConfig.checkpoint_every": ["test_rl.py::test_resume_is_bitwise_and_metrics_have_no_gaps"],
    "RLConfig.log_every": [KNOBS],
    "EvalConfig.mixture": [E2E, E2E_SFT],
    "EvalConfig.num_problems": [RL_RUN, E2E, E2E_SFT],
    "EvalConfig.num_samples": [RL_RUN, E2E_SFT],
    "EvalConfig.sampling": [RL_RUN],
    "EvalConfig.at_start": [E2E_RL, EVAL_FLAGS, "test_effects.py::test_evaluation_flags_choose_which_sft_run_evaluations_happen"],
    "EvalConfig.after_sft": ["test_effects.py::test_evaluation_flags_choose_which_sft_run_evaluations_happen", E2E,
                             E2E_SFT, EVAL_FLAGS],
    "EvalConfig.after_rl": [RL_RUN, E2E, EVAL_FLAGS],
    "EvalConfig.every_rl_steps": [KNOBS, RL_RUN, EVAL_FLAGS],
    "OutputConfig.save_dir": [E2E],
    "OutputConfig.log_level": [KNOBS],
    "OutputConfig.experiment_name": [E2E, "test_cli.py::test_existing_checkpoints_are_never_overwritten_without_resume"],
    "OutputConfig.use_wandb": [KNOBS, "test_metrics.py::test_wandb_offline_run_writes_its_files"],
    "OutputConfig.wandb_project": [KNOBS],
    "OutputConfig.mode": [E2E, E2E_RL],
    "OutputConfig.source_checkpoint": [E2E_RL],
}


def schema_fields(cls=Config, seen=None) -> list[str]:
    """'ClassName.field' for every field of every dataclass reachable from Config (through lists and `| None`)."""
    seen = set() if seen is None else seen
    found = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        nested = [a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)]
        nested += [b for a in typing.get_args(annotation) for b in typing.get_args(a) if dataclasses.is_dataclass(b)]
        if cls is not Config or not nested:  # Config's own fields are the sections themselves
            found.append(f"{cls.__name__}.{field.name}")
        for inner in nested:
            if inner not in seen:
                seen.add(inner)
                found += schema_fields(inner, seen)
    return found


def defined_tests() -> set[str]:
    names = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                names.add(f"{path.name}::{node.name}")
    return names


def test_every_config_field_names_a_test_that_shows_its_effect():
    fields = schema_fields()
    assert "TargetConfig.gpu_ranks" in fields and "DatasetSpec.reward" in fields  # the walk reaches nested specs
    missing = [f for f in fields if not FIELD_TESTS.get(f)]
    assert not missing, (
        f"config field(s) with no effect test: {', '.join(missing)}.\n"
        "Register each in FIELD_TESTS in tests/test_config_coverage.py, e.g.\n"
        f'    "{missing[0]}": ["test_<module>.py::test_<name>"],\n'
        "naming test(s) that FAIL when the field's effect is removed (a test that only sets the field is not enough)."
    )


def test_field_table_has_no_stale_entries_and_names_real_tests():
    fields = set(schema_fields())
    stale = sorted(set(FIELD_TESTS) - fields)
    assert not stale, f"FIELD_TESTS in tests/test_config_coverage.py lists fields the schema no longer has: {stale}"
    known = defined_tests()
    unknown = sorted({t for tests in FIELD_TESTS.values() for t in tests if t not in known})
    assert not unknown, (
        f"FIELD_TESTS names tests that do not exist (renamed or removed?): {unknown}; "
        "write them as 'test_<module>.py::test_<function>' for a top-level test function in tests/"
    )
