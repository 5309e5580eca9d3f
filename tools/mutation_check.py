"""Mutation check: plant curated semantic faults, one at a time, and prove the named tests catch each.

    .venv/bin/python tools/mutation_check.py --all                 # every fault (~10-15 min on 2 cores)
    .venv/bin/python tools/mutation_check.py --subset 4 --seed 7   # a seeded sample (CI)
    .venv/bin/python tools/mutation_check.py --only kl-sign clip-band
    .venv/bin/python tools/mutation_check.py --list

Each fault is (file, exact original snippet, replacement, tests). It is applied to a fresh copy of the repository in
a temporary directory (never the working tree), the named tests run there with `pytest -x`, and the fault is
*killed* when a test fails. The kill table names the failing test and the seconds it took.

A snippet that is not found exactly once in its file is an ERROR (the code drifted: re-anchor the fault to the
current code, keeping its meaning). Before the faults, the selected tests run once on the unmodified copy: a test
that already fails would "kill" everything and prove nothing, so that is an ERROR too.

Exit status: 0 every selected fault killed; 1 a fault survived; 2 an error (snippet not found, baseline failing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a copy needs to import the package, load configs and run the tests (deploy.py is run as a script).
COPIED = ("integration_training", "tests", "configs", "base_config.py", "deploy.py", "pyproject.toml")
FAULT_TIMEOUT_S = 420


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # pytest node ids relative to the repository root
    why: str


SFT = "integration_training/sft.py"
RL = "integration_training/rl.py"
STAGE = "integration_training/stage.py"
TEMPLATE = "integration_training/template.py"
T_SFT = "tests/test_sft.py::"
T_RL = "tests/test_rl.py::"
T_EFFECTS = "tests/test_effects.py::"
EQUIVALENCE = "tests/test_distributed.py::test_ddp_and_fsdp2_updates_equal_one_process_with_the_same_global_batch"
E2E = "tests/test_end_to_end.py::test_deploy_sft_then_rl_leaves_every_artefact_and_hands_sft_weights_to_rl"
KNOBS = T_EFFECTS + "test_model_and_output_fields_reach_both_stages_of_a_run"
RL_RUN = T_EFFECTS + "test_rl_run_takes_every_rl_field_from_the_rl_section"
SFT_DATA = T_EFFECTS + "test_dataset_specs_and_shuffle_seed_decide_what_sft_trains_on"
RL_ROWS = T_EFFECTS + "test_rl_rows_carry_the_custom_reward_the_advantage_kind_and_the_seeded_prompt_order"
DEVICE = T_EFFECTS + "test_device_type_decides_where_a_deploy_run_loads_the_model"

FAULTS: tuple[Fault, ...] = (
    # ---- SFT loss and its normaliser
    Fault("sft-rank-normaliser", SFT,
          "scale = dist.world_size / max(supervised, 1)", "scale = 1.0 / max(supervised, 1)",
          (EQUIVALENCE,), "SFT loss loses ×world_size: DDP's gradient average becomes a 1/world mean"),
    Fault("sft-mean-of-micro-means", SFT,
          "optimization.backward(micro_sum * scale)",
          "optimization.backward(micro_sum * dist.world_size / max(batch.num_supervised, 1) / len(micro_batches))",
          (T_SFT + "test_token_normalisation_spans_the_whole_accumulated_step",
           T_SFT + "test_accumulation_matches_one_big_micro_batch"),
          "token mean per micro-batch, then mean of means (not one token mean over the step)"),
    # Both stages clip in stage.clip_gradients: the same planted fault, caught by each stage's test.
    Fault("sft-no-grad-clip", STAGE,
          "        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)",
          "        pass",
          (T_SFT + "test_grad_clip_reports_unclipped_norm_and_clips",), "sft.optimizer.grad_clip ignored"),
    Fault("sft-accumulation-count", SFT,
          "return stage.examples_per_step // per_pass",
          "return max(1, stage.examples_per_step // (2 * per_pass))",
          (T_SFT + "test_accumulation_matches_one_big_micro_batch",
           T_SFT + "test_examples_per_step_scales_supervised_tokens"),
          "an optimizer step accumulates half of examples_per_step"),
    # ---- template: labels, mask, packing
    Fault("label-shift", TEMPLATE,
          "return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]",
          "return [ids[t] if mask[t] else IGNORE_INDEX for t in range(len(ids))]",
          ("tests/test_template.py::test_collate_padded_labels_are_pre_shifted",
           T_SFT + "test_loss_equals_hand_computation_from_full_logits"),
          "labels not shifted: position t learns to predict its own token"),
    Fault("mask-boundary", TEMPLATE,
          "return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]",
          "return [ids[t + 1] if mask[t] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]",
          ("tests/test_template.py::test_collate_padded_labels_are_pre_shifted",),
          "supervision mask off by one: first assistant token unsupervised, one token after the turn supervised"),
    Fault("packing-attends-across", TEMPLATE,
          "blocks[b, 0, start:end, start:end] = torch.ones(len(r), len(r), dtype=torch.bool).tril()",
          "blocks[b, 0, start:end, :end] = torch.ones(len(r), end, dtype=torch.bool).tril(start)",
          (T_SFT + "test_packed_rows_isolate_conversations", "tests/test_template.py::test_packed_logits_equal_separate_runs"),
          "packed conversations attend to the earlier conversations in their row"),
    Fault("packing-positions", TEMPLATE,
          "positions[b, start:end] = torch.arange(len(r))", "positions[b, start:end] = torch.arange(start, end)",
          (T_SFT + "test_packed_rows_isolate_conversations", "tests/test_template.py::test_packed_logits_equal_separate_runs"),
          "packed position ids do not restart at 0 per conversation"),
    # ---- RL advantages and loss
    Fault("advantage-not-centred", RL,
          "centred = rewards - rewards.mean(dim=1, keepdim=True)", "centred = rewards",
          (T_RL + "test_mean_advantage_by_hand",), "advantage = raw reward (no group-mean baseline)"),
    Fault("advantage-biased-std", RL,
          "return centred / (rewards.std(dim=1, keepdim=True) + eps)",
          "return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)",
          (T_RL + "test_mean_std_advantage_by_hand",), "mean_std divides by the biased std"),
    Fault("kl-sign", RL,
          "delta = ref_logprobs - logprobs", "delta = logprobs - ref_logprobs",
          (T_RL + "test_k3_kl_penalty_by_hand",), "k3 estimator of KL(ref‖policy) instead of KL(policy‖ref)"),
    Fault("kl-penalty-sign", RL,
          "loss = loss + kl_coef * kl.sum() / normaliser", "loss = loss - kl_coef * kl.sum() / normaliser",
          (T_EFFECTS + "test_kl_coef_adds_the_gradient_of_the_penalty", T_RL + "test_k3_kl_penalty_by_hand"),
          "KL penalty rewards divergence"),
    Fault("kl-not-logged", RL,
          "kl_sum = kl.sum().detach()", "kl_sum = kl.sum().detach() * 0",
          (T_EFFECTS + "test_kl_is_zero_against_itself_and_grows_with_divergence",), "logged KL is always 0"),
    Fault("clip-band", RL,
          "torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)", "torch.clamp(ratio, 1.0 - clip_eps, 1.0 + 2 * clip_eps)",
          (T_RL + "test_ppo_clipping_by_hand", T_EFFECTS + "test_clip_fraction_is_zero_inside_the_band_and_positive_outside"),
          "PPO upper clip at 1 + 2ε"),
    Fault("clip-pessimism", RL,
          "objective = torch.minimum(unclipped, clipped)", "objective = torch.maximum(unclipped, clipped)",
          (T_RL + "test_ppo_clipping_by_hand",), "PPO takes the optimistic (max) objective"),
    Fault("clip-count", RL,
          "clip_count = (clipped < unclipped).float().sum().detach()", "clip_count = logprobs.new_zeros(())",
          (T_EFFECTS + "test_clip_fraction_is_zero_inside_the_band_and_positive_outside",), "clip_frac always 0"),
    Fault("rl-rank-normaliser", RL,
          "normaliser = global_tokens / dist.world_size", "normaliser = global_tokens",
          (EQUIVALENCE,), "RL token normaliser loses ×world_size across ranks"),
    Fault("rl-micro-batch-normaliser", RL,
          "loss, parts = policy_loss(inputs, normaliser=normaliser,",
          "loss, parts = policy_loss(inputs, normaliser=float(batch.num_tokens),",
          (T_RL + "test_token_level_normalisation_across_micro_batches",),
          "RL loss normalised per micro-batch instead of over the step's tokens"),
    Fault("rl-no-grad-clip", STAGE,
          "        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)",
          "        pass",
          (T_EFFECTS + "test_rl_grad_clip_bounds_the_applied_gradient_and_reports_the_unclipped_norm",), "rl.optimizer.grad_clip ignored"),
    Fault("rl-overlong-boundary", "integration_training/problems.py",
          "<= budget]", "< budget]",
          (T_EFFECTS + "test_rl_max_length_drops_prompts_over_the_budget_and_keeps_the_boundary",),
          "a prompt that exactly fits max_length - max_new_tokens is dropped"),
    Fault("rl-eval-cadence", "integration_training/evaluate.py",
          "return every > 0 and done % every == 0 and not (done == steps and evaluation.after_rl)",
          "return every > 0 and done == steps and not evaluation.after_rl",
          (KNOBS,), "evaluation.every_rl_steps ignored"),
    Fault("rl-sampling-from-sft-section", RL,
          "settings=sampling_settings(rl.sampling),",
          "settings=sampling_settings(replace(rl.sampling, temperature=1.0, top_k=0)),",
          (RL_RUN,), "rollouts ignore rl.sampling"),
    # ---- resume
    # Removing the stages' restore_rng_state call is an equivalent mutant today (sampling is seeded per step and
    # rank, models have no dropout), so the RNG fault is planted in the restore itself.
    Fault("resume-rng-restore", "integration_training/checkpoint.py",
          '    torch.set_rng_state(state["torch"])', "    pass",
          ("tests/test_checkpoint.py::test_rng_state_round_trips_through_a_saved_file",),
          "resume does not restore torch's RNG state"),
    Fault("rl-resume-data-position", RL,
          "for step in range(start, run.total):", "for step in range(max(0, start - 1), run.total):",
          (T_RL + "test_resume_is_bitwise_and_metrics_have_no_gaps",),
          "a resumed RL run repeats the checkpoint's last step (prompts and update)"),
    Fault("sft-resume-data-position", SFT,
          "sequences = data.stream.step_sequences(step)",
          "sequences = data.stream.step_sequences(step if run.resume_from is None else "
          "step - int(run.resume_from.name.removeprefix('step_')))",
          (T_SFT + "test_resume_after_stop_or_crash_is_bitwise_identical",),
          "a resumed SFT run restarts its data stream at the beginning"),
    Fault("sft-resume-optimizer", STAGE,
          '            self.optimizer.load_state_dict(state["optimizer"])', "            pass",
          (T_SFT + "test_resume_after_stop_or_crash_is_bitwise_identical",), "SFT resume drops the optimizer state"),
    Fault("metrics-truncate", "integration_training/metrics.py",
          'row["step"] > step)]', 'row["step"] >= step)]',
          ("tests/test_metrics.py::test_truncate_after_drops_only_this_stages_later_steps",),
          "resume truncation drops the checkpoint step's own metrics"),
    Fault("checkpoint-latest-by-name", "integration_training/checkpoint.py",
          "return sorted(found, key=checkpoint_step)", "return sorted(found)",
          ("tests/test_checkpoint.py::test_latest_is_by_step_number_not_name",),
          "'latest' checkpoint chosen by name (step_1000000 < step_999999)"),
    # ---- stage hand-off and CLI
    Fault("sft-rl-handoff", "integration_training/cli.py",
          "init_model = str(run_sft(config, run_dir, resume, stop=stop))",
          "init_model = str(run_sft(config, run_dir, resume, stop=stop)) and config.model.name",
          (E2E,), "RL starts from model.name instead of SFT's final checkpoint"),
    Fault("gpu-ranks-ignored", "integration_training/cli.py",
          'os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(r) for r in config.target.gpu_ranks)', "pass",
          (T_EFFECTS + "test_gpu_ranks_become_cuda_visible_devices",), "target.gpu_ranks does not set CUDA_VISIBLE_DEVICES"),
    Fault("log-level-ignored", "integration_training/cli.py",
          "root.setLevel(config.output.log_level)", 'root.setLevel("INFO")', (KNOBS,), "output.log_level ignored"),
    Fault("compile-ignored", SFT,
          "if config.model.compile:", "if False:", (KNOBS,), "model.compile ignored"),
    # ---- config fields reaching the run
    Fault("optimizer-name-ignored", "integration_training/optim.py",
          "    params = parameter_groups(model)\n",
          '    import dataclasses; settings = dataclasses.replace(settings, name="adamw"); params = parameter_groups(model)\n',
          (KNOBS,), "every stage trains with AdamW whatever its optimizer field says"),
    Fault("advantage-kind-ignored", RL,
          "advantages = group_advantages(rewards, rl.advantage)", 'advantages = group_advantages(rewards, "mean")',
          (RL_ROWS,), "rl.advantage ignored: mean_std runs centre without dividing by the group std"),
    Fault("subset-ignored", "integration_training/data/sources.py",
          'folders = [root / spec.subset, root / spec.subset / "data"] if spec.subset else []', "folders = []",
          (SFT_DATA,), "DatasetSpec.subset ignored for a local directory: the rows beside the subset's folder are read"),
    Fault("split-ignored", "integration_training/data/sources.py",
          'and (f.stem == spec.split or f.stem.startswith(spec.split + "-"))', "and True",
          (SFT_DATA,), "DatasetSpec.split ignored for a local directory: every split's file is read"),
    Fault("device-type-ignored", "integration_training/distributed.py",
          'return torch.device("cuda", local_rank)', 'return torch.device("cpu")',
          (DEVICE,), "target.device_type='cuda' runs on the CPU"),
    # ---- rewards, evaluation, report, optimiser schedule
    Fault("reward-first-marker", "integration_training/rewards.py",
          "answer = text.rsplit(_MARKER, 1)[1]", "answer = text.split(_MARKER, 1)[1]",
          ("tests/test_rewards.py::test_extract_gsm8k_strict",), "strict GSM8K answer taken after the first ####"),
    Fault("pass-at-k", "integration_training/stats.py",
          "return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))",
          "return 1.0 - math.prod(1.0 - 1 / i for i in range(n - c + 1, n + 1))",
          ("tests/test_evaluate.py::test_pass_at_k_by_hand", "tests/test_stats.py::test_pass_at_k_is_the_unbiased_estimator"),
          "pass@k computed as pass@1"),
    Fault("eval-k-samples", "integration_training/evaluate.py",
          "rows_per_problem = k + int(greedy)", "rows_per_problem = 1 + int(greedy)",
          (RL_RUN,), "evaluation draws one sample per problem whatever evaluation.num_samples"),
    Fault("paired-test-no-flips", "integration_training/stats.py",
          "flipped = sum(d if rng.random() < 0.5 else -d for d in differences)",
          "flipped = sum(d if rng.random() < 0.5 else d for d in differences)",
          ("tests/test_stats.py::test_paired_test_detects_a_real_gain_and_not_noise",),
          "permutation test never flips signs: noise looks significant"),
    Fault("warmup-off-by-one", "integration_training/optim.py",
          "return peak * (step + 1) / warmup", "return peak * step / warmup",
          ("tests/test_optim.py::test_warmup_ratio_and_init_lr_frac",), "warmup's first step has LR 0"),
    Fault("cosine-shape", "integration_training/optim.py",
          "return peak * 0.5 * (1.0 + math.cos(math.pi * progress))", "return peak * math.cos(0.5 * math.pi * progress)",
          ("tests/test_optim.py::test_lr_schedule_shapes",), "cosine schedule of the wrong shape"),
    Fault("temperature-ignored", "integration_training/rollout.py",
          "weights = probs if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)", "weights = probs",
          (T_EFFECTS + "test_temperature_and_top_k_shape_what_is_drawn",), "sampling ignores the temperature"),
    Fault("top-k-ignored", "integration_training/rollout.py",
          "weights = weights.masked_fill(logits < kth, 0.0)", "weights = weights",
          (T_EFFECTS + "test_temperature_and_top_k_shape_what_is_drawn",), "sampling ignores top_k"),
    Fault("lora-merge-not-restored", "integration_training/lora.py",
          "                layer.get_base_layer().weight.data = original  # the untouched tensor comes back",
          "                pass",
          ("tests/test_lora.py::test_merged_for_sampling_restores_the_base_when_sampling_fails_and_is_a_no_op_"
           "without_adapters_or_sharded",),
          "LoRA sampling relies on peft's unmerge: (W + Δ) − Δ rounds, the frozen base drifts every rollout"),
    Fault("probe-prefill-unscaled", "integration_training/probe.py",
          "return prefill * prefill_scale + per_step * forwards", "return prefill + per_step * forwards",
          ("tests/test_probe.py::test_decode_extrapolation_scales_only_the_prefill",),
          "the eval probe's prefill (a quarter of a chunk's prompts) is predicted as if it were the chunk's"),
    Fault("probe-eval-full-prefill", "integration_training/probe.py",
          "    prompts = math.ceil(chunk_prompts / EVAL_PREFILL_SHARE)\n", "    prompts = chunk_prompts\n",
          ("tests/test_probe.py::test_eval_probe_shape_keeps_the_chunks_rows_on_a_quarter_of_its_prompts",),
          "the eval probe prefills every prompt of the chunk again (its slowest part, the probe over a minute)"),
    Fault("probe-rl-no-optimizer-state", "integration_training/probe.py",
          "    rl_module.train_on_rows(models, optimization, rows[:1], rl=rl, pad_id=tokenizer.pad_token_id)\n", "",
          ("tests/test_probe.py::test_rl_update_is_timed_with_the_optimizer_state_already_made",),
          "the probe's RL micro-batch runs without the optimizer's moments: its memory peak is ~1 GiB short"),
)


def copy_repo(destination: Path) -> None:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, destination / name)


def apply(fault: Fault, root: Path) -> str | None:
    """Plant `fault` in the copy at `root`; the reason it cannot be planted, or None."""
    path = root / fault.file
    if not path.is_file():
        return f"{fault.file} does not exist"
    text = path.read_text()
    count = text.count(fault.original)
    if count != 1:
        return f"snippet found {count} times in {fault.file} (need exactly 1; re-anchor it): {fault.original!r}"
    path.write_text(text.replace(fault.original, fault.replacement))
    return None


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[int | None, str, float]:
    """(pytest exit code or None on timeout, output, seconds) of `tests` run in the copy at `root`."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    # -m "": a fault's named tests run even when marked slow (the default addopts deselect those).
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-m", "", "-p", "no:cacheprovider", "-W", "ignore",
               *tests]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return None, output, time.perf_counter() - started
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def failing_test(output: str) -> str:
    found = re.findall(r"^FAILED (.+?)(?: - .*)?$", output, re.MULTILINE)
    if found:
        return found[0]
    errors = re.findall(r"^ERROR (\S+)", output, re.MULTILINE)
    return f"{errors[0]} (error)" if errors else "?"


def check_imports_from(root: Path) -> None:
    """The copy, not the working tree's (editable) install, must be what the tests import."""
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import integration_training as p; print(p.__file__)"], cwd=root,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve().is_relative_to(root.resolve()), f"the copy imports the package from {out}, not {root}"


def select(args: argparse.Namespace) -> list[Fault]:
    if args.only:
        names = {f.name for f in FAULTS}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise SystemExit(f"unknown fault(s): {unknown}; --list shows them")
        return [f for f in FAULTS if f.name in args.only]
    if args.subset is not None:
        return sorted(random.Random(args.seed).sample(list(FAULTS), min(args.subset, len(FAULTS))), key=FAULTS.index)
    return list(FAULTS)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="run every fault (the default)")
    group.add_argument("--subset", type=int, help="run N faults drawn with --seed")
    group.add_argument("--only", nargs="+", metavar="NAME", help="run these faults")
    group.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed for --subset (default 0)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmodified copy")
    parser.add_argument("--timeout", type=int, default=FAULT_TIMEOUT_S, help="seconds per fault's test run")
    args = parser.parse_args(argv)
    if args.list:
        for f in FAULTS:
            print(f"{f.name:28s} {f.file:36s} {f.why}")
        return 0
    faults = select(args)
    # SIGTERM unwinds like Ctrl-C: subprocess.run kills the running pytest and the temporary copies are removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    rows: list[tuple[str, str, str, float]] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as scratch:
        pristine = Path(scratch) / "pristine"
        copy_repo(pristine)
        check_imports_from(pristine)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for f in faults for t in f.tests))
            code, output, seconds = run_tests(pristine, tests, args.timeout * 2)
            print(f"baseline: {len(tests)} test ids on the unmodified code: exit {code} in {seconds:.0f} s", flush=True)
            if code != 0:
                print(output[-3000:])
                print(f"ERROR: the baseline fails ({failing_test(output)}); a fault cannot be judged against it")
                return 2
        for fault in faults:
            work = Path(scratch) / fault.name
            shutil.copytree(pristine, work)
            problem = apply(fault, work)
            if problem is not None:
                rows.append((fault.name, "ERROR", problem, 0.0))
                status = max(status, 2)
            else:
                code, output, seconds = run_tests(work, fault.tests, args.timeout)
                if code is None:
                    rows.append((fault.name, "killed", f"timeout after {seconds:.0f} s", seconds))
                elif code == 1:
                    rows.append((fault.name, "killed", failing_test(output), seconds))
                elif code == 0:
                    rows.append((fault.name, "SURVIVED", " ".join(fault.tests), seconds))
                    status = max(status, 1)
                else:
                    rows.append((fault.name, "ERROR", f"pytest exit {code}: {output.strip().splitlines()[-1:]}", seconds))
                    status = max(status, 2)
            shutil.rmtree(work, ignore_errors=True)
            print(f"{rows[-1][0]:28s} {rows[-1][1]:9s} {rows[-1][3]:6.1f} s  {rows[-1][2]}", flush=True)
    killed = sum(r[1] == "killed" for r in rows)
    print(f"\n| fault | result | killing test | seconds |\n|---|---|---|---|")
    for name, result, detail, seconds in rows:
        print(f"| {name} | {result} | {detail} | {seconds:.0f} |")
    print(f"\nkilled {killed}/{len(rows)} in {sum(r[3] for r in rows):.0f} s of test time")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
