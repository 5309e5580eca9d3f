"""`python deploy.py CONFIG.py [--dry-run] [--resume]`: load, validate, plan, relaunch, dispatch, exit codes.

Exit codes: 0 success; 2 a user error (one clear message, no traceback); 1 an unexpected failure (traceback).
This is the only module that decides exit codes or prints user-error messages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

from integration_training.config import (
    Config,
    ConfigError,
    runs_rl,
    runs_sft,
    to_json,
    validate,
    world_size,
)
from integration_training.errors import UserError

EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2
TORCHRUN_MARKER = "INTEGRATION_TRAINING_UNDER_TORCHRUN"
# Set by the relaunching parent: a file where ranks append the user errors they hit (one JSON line each), so that the
# parent can exit 2 with the message instead of torchrun's generic "child failed" (exit 1).
USER_ERROR_FILE = "INTEGRATION_TRAINING_USER_ERROR_FILE"
log = logging.getLogger("integration_training")


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        config = load_config_file(Path(args.config))
        validate(config)
        _set_visible_gpus(config)
        if args.dry_run:
            return _dry_run(config, args.config)
        check_device(config)
        if world_size(config.target) > 1 and TORCHRUN_MARKER not in os.environ:
            return _relaunch_under_torchrun(config, args)
        return _run(config, args)
    except ConfigError as error:
        return _user_error(f"{args.config}: {error.render()}")
    except UserError as error:
        return _user_error(str(error))


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deploy.py", description="Run SFT, RL or SFT→RL from one config file.")
    parser.add_argument("config", help="a .py file that defines `config = Config(...)`")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in its run directory")
    return parser.parse_args(argv)


def _user_error(message: str) -> int:
    report_to = os.environ.get(USER_ERROR_FILE)
    if report_to and TORCHRUN_MARKER in os.environ:
        # A rank under torchrun: the parent prints the message once for all ranks. Exiting 2 now (instead of
        # waiting in a collective) makes torchrun stop the other ranks promptly.
        with open(report_to, "a") as sink:
            sink.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "message": message}) + "\n")
        return EXIT_USER_ERROR
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


# ---------------------------------------------------------------------------------------------------- loading


def load_config_file(path: Path) -> Config:
    """Execute a config file and return its `config`; every way it can be wrong becomes a UserError/ConfigError."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass the path of a .py config such as configs/00_offline_cpu.py")
    source = path.read_text()
    try:
        compile(source, str(path), "exec")
    except SyntaxError as error:
        raise UserError(f"{path}:{error.lineno}: syntax error: {error.msg}; fix the config file") from None
    # Config files import `base_config` from the repository root, wherever they live.
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    try:
        namespace = runpy.run_path(str(path), run_name="__config__")
    except ConfigError as error:
        raise UserError(f"{_where_in(path, error)}{error.render()}") from None
    except Exception as error:  # a user's config file may raise anything; name where it did
        raise UserError(f"{_where_in(path, error)}{type(error).__name__}: {error}") from None
    if "config" not in namespace:
        raise UserError(f"{path}: defines no `config`; end the file with `config = Config(...)`")
    config = namespace["config"]
    if not isinstance(config, Config):
        raise UserError(f"{path}: `config` is a {type(config).__name__}, expected Config(...) from base_config")
    return config


def _where_in(path: Path, error: BaseException) -> str:
    """'file:line: ' of the deepest traceback frame inside the config file."""
    line = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if Path(frame.f_code.co_filename).resolve() == path.resolve():
            line = lineno
    return f"{path}:{line}: " if line is not None else f"{path}: "


# ---------------------------------------------------------------------------------------------------- devices


def _set_visible_gpus(config: Config) -> None:
    """Map gpu_ranks to CUDA_VISIBLE_DEVICES before anything imports torch.cuda."""
    if config.target.device_type == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(r) for r in config.target.gpu_ranks)


def device_absence(config: Config) -> str | None:
    """Why the requested device is absent on this machine, or None when it is present."""
    import torch

    target = config.target
    if target.device_type == "cuda":
        if not torch.cuda.is_available():
            return f"target.device_type='cuda' but no CUDA GPU is visible here (gpu_ranks={target.gpu_ranks})"
        if torch.cuda.device_count() < len(target.gpu_ranks):
            return f"target.gpu_ranks={target.gpu_ranks} asks for more GPUs than the {torch.cuda.device_count()} visible"
    if target.device_type == "mps" and not torch.backends.mps.is_available():
        return "target.device_type='mps' but MPS is not available on this machine"
    return None


def check_device(config: Config) -> None:
    absent = device_absence(config)
    if absent:
        raise UserError(f"{absent}; run on a machine that has it, or set device_type='cpu' with gpu_ranks=[]")


# ---------------------------------------------------------------------------------------------------- dry run


def _dry_run(config: Config, config_path: str) -> int:
    from integration_training import plan

    print(plan.render_plan(config, config_path, device_note=device_absence(config)))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- torchrun


def torchrun_command(config: Config, config_path: str, resume: bool) -> list[str]:
    """The torchrun invocation that re-runs this same command on every process of this node."""
    t = config.target
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={t.processes_per_node}",
        f"--nnodes={t.num_nodes}",
        f"--node_rank={t.node_rank}",
        f"--master_addr={t.master_addr}",
        f"--master_port={t.master_port}",
        str(Path(__file__).resolve().parents[1] / "deploy.py"),
        config_path,
    ]
    return command + (["--resume"] if resume else [])


def _relaunch_under_torchrun(config: Config, args: argparse.Namespace) -> int:
    """Run this node's processes under torchrun and wait; exit 2 when any rank reported a user error.

    torchrun stops every rank as soon as one exits non-zero (so a crash never leaves the others hanging in a
    collective) and then exits 1 whatever the cause; the ranks' user-error file tells the two cases apart.
    SIGTERM/SIGINT sent to this process are passed on, so the ranks checkpoint and stop rather than being orphaned.
    """
    import signal
    import subprocess
    import tempfile

    from integration_training.distributed import check_port_free

    if config.target.node_rank == 0:  # only the master node binds master_port
        check_port_free(config.target.master_addr, config.target.master_port)
    with tempfile.TemporaryDirectory(prefix="integration_training-") as scratch:
        errors = Path(scratch) / "user_errors.jsonl"
        environment = dict(os.environ, **{TORCHRUN_MARKER: "1", USER_ERROR_FILE: str(errors)})
        child = subprocess.Popen(torchrun_command(config, args.config, args.resume), env=environment)
        forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            returncode = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        messages = _reported_user_errors(errors)
    if messages:
        for message in messages:
            print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK if returncode == 0 else EXIT_FAILURE


def _reported_user_errors(path: Path) -> list[str]:
    """The distinct messages ranks wrote (every rank usually hits the same one), in first-reported order."""
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(entry["message"] for entry in lines))


# ---------------------------------------------------------------------------------------------------- running


def prepare_run_dir(config: Config, resume: bool, is_main: bool) -> Path:
    """Create the run directory; refuse to overwrite or silently resume; write the config snapshot atomically."""
    from integration_training.config import run_dir as run_dir_of

    run_dir = run_dir_of(config)
    snapshot = run_dir / "config.json"
    has_checkpoints = any(_has_checkpoints(run_dir / "checkpoints" / s) for s in ("sft", "rl"))
    if has_checkpoints and not resume:
        raise UserError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
            "or change output.experiment_name / remove the directory to start over"
        )
    if resume and not has_checkpoints:
        raise UserError(f"--resume: {run_dir} holds no checkpoints to resume from; run without --resume")
    if resume and snapshot.is_file() and json.loads(snapshot.read_text()) != json.loads(to_json(config)):
        raise UserError(
            f"--resume: the config differs from the one this run started with ({snapshot}); "
            "resume with the same config, or start a new experiment_name"
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        temporary = snapshot.with_suffix(".json.tmp")
        temporary.write_text(to_json(config) + "\n")
        os.replace(temporary, snapshot)
    return run_dir


def _setup_logging(config: Config, run_dir: Path, is_main: bool) -> None:
    root = logging.getLogger()
    root.setLevel(config.output.log_level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if is_main:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(config.output.log_level if is_main else "WARNING")
    root.addHandler(console)


def _run(config: Config, args: argparse.Namespace) -> int:
    from integration_training import plan

    is_main = int(os.environ.get("RANK", "0")) == 0
    run_dir = prepare_run_dir(config, args.resume, is_main)
    _setup_logging(config, run_dir, is_main)
    if is_main:
        print(plan.render_plan(config, args.config, device_note=None))
    try:
        dispatch(config, run_dir, args.resume)
    except UserError:
        raise
    except Exception as error:
        if type(error).__name__ == "TrainingDiverged":
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    return EXIT_OK


def dispatch(config: Config, run_dir: Path, resume: bool) -> None:
    """Run the stages `output.mode` names; RL in sft+rl starts from SFT's final checkpoint."""
    from integration_training.signals import StopRequest

    init_model = config.output.source_checkpoint
    if runs_sft(config):
        from integration_training.checkpoint import checkpoint_step
        from integration_training.sft import run_sft

        if config.data.rl_eval_mixture:
            with _timed(run_dir, "baseline evaluation"):
                held_out_eval(config, run_dir, config.model.name, "baseline", 0)
        stop = StopRequest()
        with _timed(run_dir, "SFT"):
            init_model = str(run_sft(config, run_dir, resume, stop=stop))
        if stop.requested:  # SIGTERM/SIGINT during SFT: checkpointed; RL must not start on a half-trained model
            log.warning("stopped during SFT (%s); continue with: python deploy.py CONFIG --resume", stop.reason)
            return
        if config.data.rl_eval_mixture and not runs_rl(config):
            with _timed(run_dir, "after-SFT evaluation"):
                held_out_eval(config, run_dir, init_model, "sft", checkpoint_step(Path(init_model)))
    if runs_rl(config):
        from integration_training.rl import run_rl

        assert init_model is not None, "validation guarantees a source for RL"
        rl_resume = resume and _has_checkpoints(run_dir / "checkpoints" / "rl")
        with _timed(run_dir, "RL (with its evaluations)"):
            run_rl(config, run_dir, init_model, rl_resume)
    if os.environ.get("RANK", "0") == "0":
        from integration_training import report

        report.finish_run(config, run_dir)


@contextlib.contextmanager
def _timed(run_dir: Path, phase: str):
    """Append the phase's wall time to run_dir/timings.jsonl (rank 0), for the report."""
    start = time.perf_counter()
    yield
    if os.environ.get("RANK", "0") == "0":
        with open(run_dir / "timings.jsonl", "a") as sink:
            sink.write(json.dumps({"phase": phase, "seconds": round(time.perf_counter() - start, 1)}) + "\n")


def _has_checkpoints(stage_dir: Path) -> bool:
    from integration_training.checkpoint import latest_checkpoint

    return latest_checkpoint(stage_dir) is not None


def held_out_eval(config: Config, run_dir: Path, model_name: str, stage: str, step: int) -> None:
    """Evaluate a model on `rl_eval_mixture` with RL's eval settings; records go to eval/{stage}_step_N.jsonl.

    The baseline before SFT and the after-SFT score of an SFT-only run use the very harness and problems that RL
    evaluates with, so the final table compares like with like. Skipped when the file exists (a resumed run).
    """
    from integration_training.distributed import barrier, init_distributed
    from integration_training.evaluate import eval_records_path
    from integration_training.rl import drop_overlong, load_policy, rl_examples, run_eval

    if eval_records_path(run_dir, stage, step).is_file():
        return
    rl, seed = config.rl, config.data.shuffle_seed
    dist = init_distributed(config.target)
    model, tokenizer = load_policy(model_name, config.model, dist.device, training=False)
    problems = rl_examples(config.data.rl_eval_mixture, seed, "rl_eval_mixture")
    problems = drop_overlong(problems, tokenizer, config.data.max_length, rl.max_new_tokens, "rl_eval_mixture")
    values = run_eval(model, tokenizer, problems[: rl.eval_examples], rl, seed, dist, run_dir, step, stage,
                      config.model.dtype)
    barrier(dist)
    log.info("%s evaluation: %s", stage, {k: round(v, 4) for k, v in values.items() if not k.endswith(("_low", "_high"))})
