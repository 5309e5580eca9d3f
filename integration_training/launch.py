"""`python -m integration_training.launch TORCHRUN_ARGS...`: torchrun without its tracebacks.

deploy.py starts this instead of `torch.distributed.run` directly. torchrun reports a failed or signalled rank by
raising (ChildFailedError / SignalException) — two tracebacks for what deploy.py already explains in one line from
the ranks' status file. Here those become one line and an exit status: 1 for a failed rank, 128+N for a signal.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"launch: rank {rank} (pid {failure.pid}) exited with {failure.exitcode}", file=sys.stderr)
        return 1
    except SignalException as error:
        print(f"launch: stopped by {error.sigval.name}", file=sys.stderr)
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
