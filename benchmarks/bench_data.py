"""SFT data pipeline at scale: prepare (tokenise + cache), cached second run, first step, step time by epoch.

Synthetic conversations with a SmolTalk-like shape (1-4 turns, weighted to 1-2; right-skewed user and assistant
lengths; ~500 tokens on average under SmolLM2's template), at several sizes. Per size:
  prepare   wall time, conversations/s, CPU seconds (the process and its tokenising pool together) and peak RSS
            (summed over the process and its pool, sampled) of a fresh child process tokenising and writing the
            memory-mapped cache (the rows are in memory before the clock starts, as a loaded dataset would be)
  cached    time for the same call once the cache exists (a second run / a resume)
  first     time from the mapped cache to the first step's rows (stream build = BFD rows, epoch 0 permutations)
  step e1/e3  median time to produce one step's rows (conversations as token lists), in epoch 1 and epoch 3
Collation (template.collate_packed) is left out: it is the trainer's cost, the same in every epoch, and changes
with the lead's position_ids collation (the 4-D mask of 32 rows × 2048² alone takes seconds per step today).
Sizes above --tokenise-up-to skip real tokenisation: their conversations are token arrays with lengths drawn
from the tokenised size's lengths (the stream and packing see the same distribution), and `prepare` is then
extrapolated from the largest tokenised size's per-conversation time, marked `~`.
Run: flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_data.py [--sizes 10000 100000 500000]
     [--tokenise-up-to 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = ("the model data step token answer value result first second because which would could should every "
         "number problem think explain example write code function return list python table summary question").split()


def synthetic_examples(count: int, seed: int):
    """`count` conversations: 1-4 turns (weighted to 1-2), lognormal user and answer lengths in words. Contents are
    slices of one long random word text (fast: 500K conversations in seconds), cut at word boundaries."""
    from integration_training.data import Example

    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)[rng.integers(0, len(WORDS), 1_000_000)]
    text = " ".join(words.tolist())
    starts = np.concatenate([[0], np.cumsum([len(w) + 1 for w in words.tolist()])])  # word k at starts[k]
    turns = rng.choice([1, 2, 3, 4], size=count, p=[0.5, 0.3, 0.12, 0.08])
    user = np.clip(rng.lognormal(np.log(40), 0.8, size=(count, 4)), 3, 600).astype(np.int64)
    answer = np.clip(rng.lognormal(np.log(150), 0.7, size=(count, 4)), 5, 1200).astype(np.int64)
    first = rng.integers(0, len(words) - 1300, size=(count, 4, 2))

    def piece(k: int, n: int) -> str:
        return text[starts[k] : starts[k + n] - 1]

    examples = []
    for i in range(count):
        messages = []
        for t in range(int(turns[i])):
            messages.append({"role": "user", "content": piece(int(first[i, t, 0]), int(user[i, t]))})
            messages.append({"role": "assistant", "content": piece(int(first[i, t, 1]), int(answer[i, t]))})
        examples.append(Example(messages=tuple(messages), reference=None, reward=None, source=f"synthetic/{i % 3}"))
    return examples


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class TreeRSS:
    """Peak of the summed resident memory of this process and its descendants (the tokenising pool), sampled every
    50 ms in a thread. Shared pages count once per process, so this errs high."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, sum(_rss_kib(pid) for pid in _tree(os.getpid())))

    @property
    def peak_mib(self) -> float:
        return self.peak / 1024.0


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        found = []
        for parent in frontier:
            for task in Path(f"/proc/{parent}/task").glob("*/children"):
                try:
                    found += [int(p) for p in task.read_text().split()]
                except OSError:
                    pass
        pids += found
        frontier = found
    return pids


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_prepare(args) -> None:
    """In a fresh process: prepare (or map) `size` conversations; print seconds, peak RSS and lengths' file."""
    from integration_training.data.prepared import prepare
    from integration_training.models import load_tokenizer, provision_offline_model

    tokenizer = load_tokenizer(str(provision_offline_model()))
    examples = synthetic_examples(args.size, seed=0)
    with TreeRSS() as tree:
        started = time.perf_counter()
        cpu = os.times()
        prepared = prepare(tokenizer, examples, args.max_length, Path(args.cache))
        seconds = time.perf_counter() - started
        after = os.times()
    cpu_s = (after.user + after.system + after.children_user + after.children_system
             - cpu.user - cpu.system - cpu.children_user - cpu.children_system)
    np.save(Path(args.cache) / f"lengths-{args.size}.npy", prepared.lengths)
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_s": cpu_s, "rss_mib": peak_rss_mib(),
                                  "tree_rss_mib": max(tree.peak_mib, peak_rss_mib()), "prepared": prepared.prepared_here,
                                  "kept": len(prepared), "tokens": int(prepared.offsets[-1])}), flush=True)


def run_child(args, size: int) -> dict:
    command = [sys.executable, __file__, "--child", "--size", str(size), "--cache", args.cache,
               "--max-length", str(args.max_length)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def in_memory_prepared(lengths: np.ndarray):
    from integration_training.data.prepared import PreparedConversations
    from integration_training.template import LengthReport

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.random.default_rng(0).integers(10, 40000, int(offsets[-1]), dtype=np.int32)
    mask = np.ones(int(offsets[-1]), dtype=np.uint8)
    return PreparedConversations(ids=ids, mask=mask, offsets=offsets, report=LengthReport(0, ()), key="synthetic",
                                 prepared_here=False)


def time_stream(prepared, args) -> dict:
    from integration_training.data.stream import SFTStream

    started = time.perf_counter()
    stream = SFTStream(prepared, seed=0, packing=True, max_length=args.max_length, sequences_per_step=args.per_step)
    stream.step_sequences(0)
    first = time.perf_counter() - started
    fill = float(prepared.lengths.sum()) / (stream.rows_per_epoch * args.max_length)

    def step_times(epoch: int) -> float:
        start = stream.steps_for_epochs(epoch) + 1  # a step inside the epoch (not its first)
        times = []
        for step in range(start, start + args.steps):
            t = time.perf_counter()
            stream.step_sequences(step)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return {"first_s": first, "e1_ms": step_times(1) * 1e3, "e3_ms": step_times(3) * 1e3, "fill": fill,
            "rows": stream.rows_per_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--tokenise-up-to", type=int, default=10_000,
                        help="sizes above this get token arrays instead of real tokenisation (see docstring)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--per-step", type=int, default=32, help="packed rows per optimizer step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per epoch")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--size", type=int)
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.child:
        child_prepare(args)
        return
    print(f"bench_data: {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), max_length {args.max_length}, "
          f"{args.per_step} packed rows/step, SmolLM2 tokenizer; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    header = (f"{'conversations':>13} {'tokens':>11} {'prepare s':>10} {'conv/s':>7} {'CPU s':>7} {'peak RSS MiB':>12} "
              f"{'cached s':>9} {'first step s':>12} {'step e1 ms':>10} {'step e3 ms':>10} {'row fill':>8}")
    print(header)
    measured_lengths, per_conversation = None, None
    with tempfile.TemporaryDirectory() as cache:
        args.cache = cache
        for size in sorted(args.sizes):
            if size <= args.tokenise_up_to:
                cold = run_child(args, size)
                warm = run_child(args, size)
                assert cold["prepared"] and not warm["prepared"]
                lengths = np.load(Path(cache) / f"lengths-{size}.npy")
                measured_lengths, per_conversation = lengths, cold["seconds"] / size
                prepare_s, rate, cpu_s = f"{cold['seconds']:.1f}", f"{size / cold['seconds']:.0f}", f"{cold['cpu_s']:.0f}"
                rss, cached_s = f"{cold['tree_rss_mib']:.0f}", f"{warm['seconds']:.2f}"
            else:
                assert measured_lengths is not None, "the smallest size must be tokenised (--tokenise-up-to)"
                lengths = np.random.default_rng(size).choice(measured_lengths, size)
                prepare_s, rate, cpu_s, rss, cached_s = f"~{per_conversation * size:.0f}", "-", "-", "-", "-"
            prepared = in_memory_prepared(lengths)
            result = time_stream(prepared, args)
            print(f"{size:>13} {int(lengths.sum()):>11} {prepare_s:>10} {rate:>7} {cpu_s:>7} {rss:>12} {cached_s:>9} "
                  f"{result['first_s']:>12.2f} {result['e1_ms']:>10.2f} {result['e3_ms']:>10.2f} "
                  f"{result['fill']:>8.1%}", flush=True)


if __name__ == "__main__":
    main()
