"""Fault injection for tests/test_faults.py: `apply_fault(spec, setattr)` patches the package so that a fault happens
at a named point of a real run; `python tests/fault_driver.py SPEC CONFIG [--resume]` runs deploy.py's `main` with
it in a fresh process (for faults that end the process, like SIGKILL).

SPEC is `kind:arg:...`:
  signal:SIGTERM:sft-step:N    send the signal to this process right after the N-th SFT optimizer step
  signal:SIGINT:rl-step:N      ... after the N-th RL step's rollout+update
  signal:SIGTERM:baseline      ... as the baseline evaluation starts
  signal:SIGINT:load:N         ... as the N-th model load starts
  signal:SIGTERM:rl-eval:N     ... as the N-th evaluation (evaluate.run: baseline, after SFT, during RL, ...) starts
  signal:SIGTERM:save:N        ... in the middle of the N-th checkpoint save
  signal:SIGTERM:report        ... as the final report starts
  signal2:SIGINT:sft-step:N    two SIGINTs after the N-th SFT step (the user insists)
  nan:sft:N / nan:rl:N         the loss of the N-th SFT step / RL update is NaN
  enospc:save:N                the N-th checkpoint save hits a full disk (after writing part of a file)
  enospc:metrics:N             the N-th metrics line hits a full disk
  kill:sft-step:N              SIGKILL this process after the N-th SFT step (a hard crash)
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _after_nth(module, name: str, n: int, action, setattr_, before: bool = False) -> None:
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == n:
            action()
        result = original(*args, **kwargs)
        if not before and calls[0] == n:
            action()
        return result

    setattr_(module, name, wrapper)


def _send(signum: int):
    return lambda: os.kill(os.getpid(), signum)


def apply_fault(spec: str, setattr_=setattr) -> None:
    from integration_training import checkpoint, cli, evaluate, metrics, models, report, rl, sft

    kind, *rest = spec.split(":")
    if kind in ("signal", "signal2", "kill"):
        if kind == "kill":
            signum, (point, *arg) = signal.SIGKILL, rest
        else:
            signum, point, *arg = getattr(signal, rest[0]), rest[1], *rest[2:]
        action = _send(signum)
        if kind == "signal2":
            action = lambda: (os.kill(os.getpid(), signum), os.kill(os.getpid(), signum))  # noqa: E731
        n = int(arg[0]) if arg else 1
        targets = {
            "sft-step": (sft, "train_step", False),
            "rl-step": (rl, "_one_step", False),
            "baseline": (cli, "held_out_eval", True),
            "load": (models, "load_model", True),
            "rl-eval": (evaluate, "run", True),
            "report": (report, "finish_run", True),
        }
        if point == "save":
            _save_with(checkpoint, n, action, setattr_)
            return
        module, name, before = targets[point]
        _after_nth(module, name, n, action, setattr_, before=before)
        return
    if kind == "nan":
        stage, n = rest[0], int(rest[1])
        if stage == "sft":
            _nan_during(sft, "train_step", sft, "batch_loss_sum", n, setattr_)
        else:
            _nan_during(rl, "train_on_rows", rl, "policy_loss", n, setattr_)
        return
    if kind == "enospc":
        what, n = rest[0], int(rest[1])
        if what == "save":
            _save_with(checkpoint, n, None, setattr_)
        else:
            _metrics_full(metrics, n, setattr_)
        return
    raise AssertionError(f"unknown fault {spec}")


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_with(checkpoint, n: int, action, setattr_) -> None:
    """Run `action` (a signal) or a full disk in the middle of the n-th checkpoint save."""
    import torch

    original = checkpoint.save_checkpoint
    calls = [0]

    def wrapper(stage_dir, step, model, tokenizer, train_state, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return original(stage_dir, step, model, tokenizer, train_state, **kwargs)
        real_save = torch.save

        def save_then_fault(obj, file, *args, **kw):
            if action is not None:
                action()
                return real_save(obj, file, *args, **kw)
            Path(file).write_bytes(b"partial")  # a partial file, as a full disk leaves it
            _disk_full()

        torch.save = save_then_fault
        try:
            return original(stage_dir, step, model, tokenizer, train_state, **kwargs)
        finally:
            torch.save = real_save

    setattr_(checkpoint, "save_checkpoint", wrapper)


def _nan_during(outer_module, outer: str, inner_module, inner: str, n: int, setattr_) -> None:
    outer_original, inner_original = getattr(outer_module, outer), getattr(inner_module, inner)
    calls = [0]

    def poisoned(*args, **kwargs):
        result = inner_original(*args, **kwargs)
        if isinstance(result, tuple):  # rl.policy_loss: (loss, parts)
            return (result[0] * float("nan"), result[1])
        return result * float("nan")

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return outer_original(*args, **kwargs)
        setattr(inner_module, inner, poisoned)
        try:
            return outer_original(*args, **kwargs)
        finally:
            setattr(inner_module, inner, inner_original)

    setattr_(outer_module, outer, wrapper)


def _metrics_full(metrics, n: int, setattr_) -> None:
    original_init = metrics.MetricsLogger.__init__
    writes = [0]

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            writes[0] += 1
            if writes[0] == n:
                self.handle.write(text[: len(text) // 2])
                _disk_full()
            return self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self._file is not None:
            self._file = FullDisk(self._file)

    setattr_(metrics.MetricsLogger, "__init__", init)


if __name__ == "__main__":
    apply_fault(sys.argv[1])
    from integration_training.cli import main

    sys.exit(main(sys.argv[2:]))
