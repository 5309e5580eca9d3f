"""`python deploy.py CONFIG.py [--dry-run] [--resume]`: load, validate, plan, relaunch, dispatch, exit codes.

Exit codes (README has the table):
  0  finished (or a dry run that found nothing wrong);
  1  a fault: training diverged (one line), a rank died, or an unexpected failure (traceback — a bug to report);
  2  a user error: one line naming the field / file:line / path and the fix, before anything expensive;
  3  interrupted (SIGINT/SIGTERM): the run stopped at a step boundary with a checkpoint; `--resume` continues.
This is the only module that decides exit codes or prints user-error messages.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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
from integration_training.errors import TrainingDiverged, UserError

EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3
TORCHRUN_MARKER = "INTEGRATION_TRAINING_UNDER_TORCHRUN"
# Set by the relaunching parent: a file where ranks append what ended them (one JSON line each: a user error, an
# interruption or a fault), so that the parent exits 2/3/1 with the message instead of torchrun's generic failure.
USER_ERROR_FILE = "INTEGRATION_TRAINING_USER_ERROR_FILE"
LOCK_FILE = ".lock"
STALE_ATTEMPTS = "stale_attempts"
log = logging.getLogger("integration_training")


class Interrupted(Exception):
    """A stage stopped early on SIGINT/SIGTERM after checkpointing (exit 3)."""


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        config = load_config_file(Path(args.config))
        validate(config)
        check_optional_packages(config)
        _set_visible_gpus(config)
        if args.dry_run and args.probe:
            return _dry_run_probe(config, args.config)
        if args.dry_run:
            return _dry_run(config, args.config)
        check_output_location(config)
        check_device(config)
        if world_size(config.target) > 1 and TORCHRUN_MARKER not in os.environ:
            if under_foreign_torchrun():
                return _run(config, args)  # the user's own torchrun started every rank: join it, relaunch nothing
            return _relaunch_under_torchrun(config, args)
        return _run(config, args)
    except ConfigError as error:
        return _user_error(f"{args.config}: {error.render()}")
    except UserError as error:
        return _user_error(str(error))
    except Interrupted as error:
        return _report("interrupted", str(error), EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        return _report("interrupted", "by SIGINT (a second SIGINT, or one before training set up its handlers): "
                       "stopped without a new checkpoint; the last complete checkpoint (if any) is kept — continue "
                       "with --resume", EXIT_INTERRUPTED)
    except TrainingDiverged as error:
        return _report("fault", str(error), EXIT_FAILURE)


def under_foreign_torchrun() -> bool:
    """True when this process is a rank of a torchrun the user started (not deploy.py's own relaunch)."""
    return TORCHRUN_MARKER not in os.environ and "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deploy.py", description="Run SFT, RL or SFT→RL from one config file.")
    parser.add_argument("config", help="a .py file that defines `config = Config(...)`")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in its run directory")
    parser.add_argument("--probe", action="store_true",
                        help="load the model and measure each stage's worst case (time, memory) before committing; "
                             "with --dry-run stop after the estimate, otherwise print it and run")
    return parser.parse_args(argv)


def _user_error(message: str) -> int:
    return _report("user_error", message, EXIT_USER_ERROR)


def _report(kind: str, message: str, code: int) -> int:
    """Print `message` as one `error:` line (or, on a rank of deploy.py's torchrun, hand it to the parent)."""
    report_to = os.environ.get(USER_ERROR_FILE)
    if report_to and TORCHRUN_MARKER in os.environ:
        # A rank under torchrun: the parent prints the message once for all ranks. An interrupted rank exits 0 so
        # that torchrun ends quietly; a user error exits 2 at once, which makes torchrun stop the other ranks.
        with open(report_to, "a") as sink:
            entry = {"rank": int(os.environ.get("RANK", "0")), "kind": kind, "message": message}
            sink.write(json.dumps(entry) + "\n")
        return EXIT_OK if kind == "interrupted" else code
    print(f"error: {message}" if kind != "interrupted" else f"interrupted: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------------- loading


def load_config_file(path: Path) -> Config:
    """Execute a config file and return its valid `config`; every way it can be wrong becomes a UserError/ConfigError.

    Construction problems (missing/unknown fields) of every section are collected while the file runs and reported
    together with the type/range/cross-field problems of the rest, so one run shows every mistake.
    """
    from integration_training.config import collecting_problems, problems as config_problems

    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass the path of a .py config such as configs/00_offline_cpu.py")
    source = _read_utf8(path, "config file")
    try:
        compile(source, str(path), "exec")
    except SyntaxError as error:
        raise UserError(f"{path}:{error.lineno}: syntax error: {error.msg}; fix the config file") from None
    except (ValueError, RecursionError, MemoryError) as error:  # NUL bytes, absurd nesting
        raise UserError(f"{path}: cannot be compiled ({type(error).__name__}: {error}); fix the config file") from None
    # Config files import `base_config` from the repository root, wherever they live.
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    try:
        with collecting_problems() as collected:
            namespace = runpy.run_path(str(path), run_name="__config__")
    except ConfigError as error:
        raise UserError(f"{_where_in(path, error)}{error.render()}") from None
    except Exception as error:  # a user's config file may raise anything; name where it did
        raise UserError(f"{_where_in(path, error)}{type(error).__name__}: {_first_line(error)}") from None
    if "config" not in namespace:
        raise UserError(f"{path}: defines no `config`; end the file with `config = Config(...)`")
    config = namespace["config"]
    if not isinstance(config, Config):
        raise UserError(f"{path}: `config` is a {type(config).__name__}, expected Config(...) from base_config")
    found = [_relative_to_cwd(p) for p in collected.problems] + config_problems(config)
    if found:
        raise ConfigError(found)
    return config


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _relative_to_cwd(problem: str) -> str:
    """Problems carry the absolute path of the config file; shorten it to how the user wrote it where possible."""
    cwd = str(Path.cwd()) + os.sep
    return problem[len(cwd):] if problem.startswith(cwd) else problem


def _read_utf8(path: Path, what: str) -> str:
    """The text of `path`; a file that is not UTF-8 is a UserError naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{path}:{line}: the {what} is not UTF-8 (byte {data[error.start]:#04x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None


def _where_in(path: Path, error: BaseException) -> str:
    """'file:line: ' of the deepest traceback frame inside the config file."""
    line = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if Path(frame.f_code.co_filename).resolve() == path.resolve():
            line = lineno
    return f"{path}:{line}: " if line is not None else f"{path}: "


# ---------------------------------------------------------------------------------------------------- environment


def check_optional_packages(config: Config) -> None:
    """A config that asks for an optional package this environment lacks is refused before anything loads."""
    if config.output.use_wandb and not _installed("wandb"):
        raise UserError("output.use_wandb=True but wandb is not installed; install the extra "
                        "(pip install 'integration-training[wandb]', or pip install wandb==0.31.0) or set "
                        "output.use_wandb=False")


def _installed(name: str) -> bool:
    """Whether `import name` would find a module (without importing it: wandb's import alone takes seconds)."""
    import importlib.util

    if name in sys.modules:  # imported already, or blocked (None)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


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
    """The plan, after every check the real run makes before training (same messages, same exit code)."""
    from integration_training import plan

    check_output_location(config)
    print(plan.render_plan(config, config_path, device_note=device_absence(config)))
    return EXIT_OK


def check_output_location(config: Config) -> None:
    """output.save_dir must be creatable and writable: refused now rather than after loading a model."""
    from integration_training.config import run_dir as run_dir_of

    target = run_dir_of(config).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"output.save_dir: {existing} is a file, so {target} cannot be created; point save_dir at a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"output.save_dir: {existing} is not writable by this user, so {target} cannot be written; "
            "pick a folder you can write to"
        )


def _dry_run_probe(config: Config, config_path: str) -> int:
    """The plan, then the probe's measured worst case per stage and the predicted time; exit 2 on an OOM."""
    from integration_training import plan, probe

    is_main = int(os.environ.get("RANK", "0")) == 0  # under a user's torchrun every rank probes its own shard
    logging.getLogger().setLevel(config.output.log_level)
    _setup_console(config, logging.getLogger(), is_main)  # no run directory, so no train.log
    if is_main:
        print(plan.render_plan(config, config_path, device_note=None))
    check_device(config)
    estimate = probe.run_probe(config)  # the maximum over ranks (probe.run_probe reduces it)
    if is_main:
        print("\n".join(estimate.lines()))
    return EXIT_OK


def _probe_before_run(config: Config, run_dir: Path) -> None:
    """`deploy.py CONFIG --probe`: the same estimate at the start of a real run, kept for report.md."""
    from integration_training import probe

    estimate = probe.run_probe(config)
    for line in estimate.lines():
        log.info("%s", line)
    if int(os.environ.get("RANK", "0")) == 0:
        probe.write_estimate(estimate, run_dir)


# ---------------------------------------------------------------------------------------------------- torchrun


def torchrun_command(config: Config, config_path: str, resume: bool) -> list[str]:
    """The torchrun invocation that re-runs this same command on every process of this node."""
    t = config.target
    command = [
        sys.executable,
        "-m",
        "integration_training.launch",  # torchrun, minus its tracebacks
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
    """Run this node's processes under torchrun and wait; exit 2/3/1 as the ranks' status file says.

    torchrun stops every rank as soon as one exits non-zero (so a crash never leaves the others hanging in a
    collective). torchrun and the ranks run in their own session: the terminal's Ctrl-C (and a SIGTERM sent to
    this process) reaches only this parent, which creates the stop file the ranks poll at every step boundary —
    they checkpoint together and end quietly. A second SIGINT terminates torchrun (the last checkpoint stays).
    """
    import signal
    import subprocess
    import tempfile

    from integration_training.distributed import check_port_free, resolve_master_addr
    from integration_training.signals import STOP_FILE_ENV

    target = config.target
    resolve_master_addr(target.master_addr, target.master_port)
    if target.node_rank == 0:  # only the master node binds master_port
        check_port_free(target.master_addr, target.master_port)
    with run_lock(config), tempfile.TemporaryDirectory(prefix="integration_training-") as scratch:
        statuses, stop_file = Path(scratch) / "rank_status.jsonl", Path(scratch) / "stop"
        environment = dict(os.environ, **{TORCHRUN_MARKER: "1", USER_ERROR_FILE: str(statuses),
                                          STOP_FILE_ENV: str(stop_file)})
        child = subprocess.Popen(torchrun_command(config, args.config, args.resume), env=environment,
                                 start_new_session=True)
        signals_seen: list[str] = []

        def on_signal(signum: int, _frame) -> None:
            name = signal.Signals(signum).name
            if signals_seen and signum == signal.SIGINT:
                child.terminate()  # the user insists: torchrun stops the ranks now
            elif not signals_seen:
                print(f"{name} received: the ranks checkpoint at the next step boundary and stop", file=sys.stderr)
                # Atomically: a rank polling between the file's creation and its write would read no reason
                # ("stop file") while the other reads the signal's name, and the ranks would report two lines.
                staging = stop_file.with_name(stop_file.name + ".tmp")
                staging.write_text(name)
                os.replace(staging, stop_file)
            signals_seen.append(name)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            returncode = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        entries = _rank_statuses(statuses)
    for kind, code in (("user_error", EXIT_USER_ERROR), ("fault", EXIT_FAILURE), ("interrupted", EXIT_INTERRUPTED)):
        messages = list(dict.fromkeys(e["message"] for e in entries if e.get("kind", "user_error") == kind))
        if messages:
            for message in messages:
                _report(kind, message, code)
            return code
    if returncode == 0 and signals_seen:
        return EXIT_OK  # the stop came after the last checkpoint: the run finished
    if returncode == 0:
        return EXIT_OK
    if signals_seen:
        return _report("interrupted", "interrupted before a step boundary: stopped without a new checkpoint; the last "
                       "complete checkpoint is kept — continue with --resume", EXIT_INTERRUPTED)
    return _report("fault", f"a training process died (torchrun exit {returncode}); see the log above and "
                   f"{_run_dir(config) / 'train.log'}; the last complete checkpoint is kept — continue with --resume",
                   EXIT_FAILURE)


def _rank_statuses(path: Path) -> list[dict]:
    """What the ranks reported (every rank usually reports the same), in first-reported order."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def _run_dir(config: Config) -> Path:
    from integration_training.config import run_dir as run_dir_of

    return run_dir_of(config)


@contextlib.contextmanager
def run_lock(config: Config):
    """Hold an exclusive lock on the run directory for as long as this run lives; a second launch is refused."""
    import fcntl

    run_dir = _run_dir(config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Per node: the nodes of one multi-node job share the run directory (a shared filesystem) legitimately.
        handle = open(run_dir / f"{LOCK_FILE}-node{config.target.node_rank}", "a+")
    except OSError as error:
        raise UserError(f"output.save_dir: cannot create {run_dir} ({error.strerror}); pick a writable folder") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"{run_dir} is in use by another run ({holder}); wait for it to finish, or change "
                "output.experiment_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------- running


def prepare_run_dir(config: Config, resume: bool, is_main: bool) -> Path:
    """Create the run directory; refuse to overwrite or silently resume; write the config snapshot atomically.

    A directory without checkpoints (a run that stopped before its first one) is started over from scratch after
    saying so; its files (metrics, baseline evaluation, logs) are moved to `stale_attempts/<time>/`, never reused.
    """
    from integration_training.checkpoint import clean_stale_staging, latest_checkpoint, verify_checkpoint
    from integration_training.stage import STAGES, refuse_overwrite, stage_dir

    run_dir = _run_dir(config)
    snapshot = run_dir / "config.json"
    if is_main:  # first: a crash between a re-save's two renames left the good copy under .old-*
        for stage in STAGES:
            clean_stale_staging(stage_dir(run_dir, stage))
    stage_dirs = [stage_dir(run_dir, s) for s in STAGES]
    refuse_overwrite(run_dir, stage_dirs, resume)
    latest = [latest_checkpoint(d) for d in stage_dirs]
    has_checkpoints = any(latest)
    if resume and not has_checkpoints:
        raise UserError(f"--resume: {run_dir} holds no checkpoints to resume from; run without --resume")
    if resume:
        _check_snapshot(config, snapshot)
        for path in latest:
            if path is not None:
                verify_checkpoint(path)
    if is_main:
        if not resume:
            _set_aside_stale_attempt(run_dir)
        _write_atomically(snapshot, to_json(config) + "\n")
    return run_dir


def _check_snapshot(config: Config, snapshot: Path) -> None:
    """--resume needs the config the run started with; node_rank is per node and may differ."""
    if not snapshot.is_file():
        return
    try:
        saved = json.loads(snapshot.read_text(encoding="utf-8"))
        assert isinstance(saved, dict) and isinstance(saved.get("target"), dict)
    except (ValueError, AssertionError):
        log.warning("%s is unreadable (torn write?); it is rewritten from this config", snapshot)
        return
    current = json.loads(to_json(config))
    saved["target"].pop("node_rank", None)
    current["target"].pop("node_rank", None)
    if saved != current:
        differing = _differing_fields(current, saved, "")
        raise UserError(
            f"--resume: the config differs from the one this run started with ({snapshot}: "
            f"{', '.join(differing[:5]) or 'structure'}); resume with the same config, or start a new experiment_name"
        )


def _differing_fields(current: dict, saved, prefix: str) -> list[str]:
    """Dotted paths of the leaves (or whole lists) where `current` differs from `saved`, sorted."""
    found = []
    for name, value in current.items():
        other = saved.get(name) if isinstance(saved, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            found += _differing_fields(value, other, f"{prefix}{name}.")
        elif value != other:
            found.append(f"{prefix}{name}")
    return sorted(found)


def _set_aside_stale_attempt(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.iterdir() if not p.name.startswith(LOCK_FILE) and p.name != STALE_ATTEMPTS
                 ] if run_dir.is_dir() else []
    if not leftovers:
        return
    destination = run_dir / STALE_ATTEMPTS / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    destination.mkdir(parents=True, exist_ok=True)
    for path in leftovers:
        os.replace(path, destination / path.name)
    print(f"note: {run_dir} held a run that stopped before its first checkpoint; starting from scratch "
          f"(its files were moved to {destination})", file=sys.stderr)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{path}: no space left on device; free space or move output.save_dir") from None
        raise


def _setup_logging(config: Config, run_dir: Path, is_main: bool) -> None:
    root = logging.getLogger()
    root.setLevel(config.output.log_level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if is_main:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    _setup_console(config, root, is_main)


def _setup_console(config: Config, root: logging.Logger, is_main: bool) -> None:
    """The terminal: log lines above the progress bars; the libraries' own bars and warnings off below DEBUG."""
    from integration_training.console import console_handler, quiet_libraries

    quiet_libraries(config.output.log_level)
    root.addHandler(console_handler(config.output.log_level, is_main))


def _run(config: Config, args: argparse.Namespace) -> int:
    from integration_training import plan
    from integration_training.signals import StopRequest

    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    # deploy.py's own relaunch: the parent holds the lock. Otherwise (one process, or the user's torchrun) rank 0.
    holds_lock = is_main and TORCHRUN_MARKER not in os.environ
    stop = StopRequest.from_environment()
    with run_lock(config) if holds_lock else contextlib.nullcontext(), stop.handle_signals():
        run_dir = prepare_run_dir(config, args.resume, is_main)
        _setup_logging(config, run_dir, is_main)
        if is_main:
            print(plan.render_plan(config, args.config, device_note=None))
        if args.probe:
            _probe_before_run(config, run_dir)
        try:
            dispatch(config, run_dir, args.resume, stop)
        except (UserError, Interrupted, TrainingDiverged, KeyboardInterrupt):
            raise
        except Exception as error:
            if TORCHRUN_MARKER not in os.environ:
                raise  # one process: the traceback is the bug report
            # A rank of deploy.py's torchrun: the traceback goes to the log file, the parent prints one line.
            with open(run_dir / "train.log", "a") as sink:
                sink.write(f"rank {rank} failed:\n{traceback.format_exc()}\n")
            return _report("fault", f"rank {rank} failed: {type(error).__name__}: {str(error)[:200]} (traceback in "
                           f"{run_dir / 'train.log'}); the last complete checkpoint is kept — continue with --resume",
                           EXIT_FAILURE)
    return EXIT_OK


def dispatch(config: Config, run_dir: Path, resume: bool, stop=None) -> None:
    """Run the stages `output.mode` names, with the evaluations `evaluation` asks for; RL in sft+rl starts from
    SFT's final checkpoint.

    `stop`: the run's StopRequest. A stage it stops early raises Interrupted (exit 3) with no report; a stop that
    arrives once SFT is complete keeps RL from starting.
    """
    from integration_training.checkpoint import checkpoint_step
    from integration_training.signals import StopRequest

    stop = stop if stop is not None else StopRequest()
    evaluation = config.evaluation
    init_model = config.output.source_checkpoint
    if evaluation.at_start:  # the model the run starts from: model.name, or the source checkpoint in mode "rl"
        with _timed(run_dir, "baseline evaluation"):
            held_out_eval(config, run_dir, config.model.name if runs_sft(config) else init_model, "baseline", 0)
    if runs_sft(config):
        from integration_training.sft import run_sft

        if _agreed_stop(config, stop) and not resume:
            raise Interrupted(f"by {stop.reason} before the first SFT step: no checkpoint was written; start again "
                              "without --resume (the run directory is set aside and reused)")
        with _timed(run_dir, "SFT"):
            init_model = str(run_sft(config, run_dir, resume, stop=stop))
        if stop.stopped_at is not None or (runs_rl(config) and _agreed_stop(config, stop)):
            where = stop.stopped_at or "the end of SFT (RL not started)"
            raise Interrupted(f"by {stop.reason} at {where}; checkpoint {init_model} kept; continue with: "
                              "python deploy.py CONFIG --resume")
        if evaluation.after_sft:
            with _timed(run_dir, "after-SFT evaluation"):
                held_out_eval(config, run_dir, init_model, "sft", checkpoint_step(Path(init_model)))
    if runs_rl(config):
        from integration_training.rl import run_rl

        assert init_model is not None, "validation guarantees a source for RL"
        from integration_training.stage import stage_dir

        rl_resume = resume and _has_checkpoints(stage_dir(run_dir, "rl"))
        with _timed(run_dir, "RL (with its evaluations)"):
            final = run_rl(config, run_dir, init_model, rl_resume, stop=stop)
        if stop.stopped_at is not None:
            raise Interrupted(f"by {stop.reason} at {stop.stopped_at}; checkpoint {final} kept; continue with: "
                              "python deploy.py CONFIG --resume")
        if evaluation.after_rl:
            with _timed(run_dir, "after-RL evaluation"):
                held_out_eval(config, run_dir, final, "rl", checkpoint_step(Path(final)))
    if os.environ.get("RANK", "0") == "0":
        from integration_training import report

        report.finish_run(config, run_dir)


def _agreed_stop(config: Config, stop) -> bool:
    """Whether any rank saw a stop request; every rank gets the same answer (they must leave together)."""
    if world_size(config.target) == 1:
        return stop.requested
    from integration_training.distributed import init_distributed

    return stop.agree(init_distributed(config.target))


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


def held_out_eval(config: Config, run_dir: Path, model: str | Path, stage: str, step: int) -> None:
    """The evaluation stage on a saved model (`evaluate.run`; skipped when the run already holds it: a resume)."""
    from integration_training import evaluate
    from integration_training.console import format_values

    values = evaluate.run(config, run_dir, stage, step, source=model)
    log.info("%s evaluation: %s", stage, format_values({k: v for k, v in values.items() if not k.endswith(("_low", "_high"))}))
