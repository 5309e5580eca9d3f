"""The terminal during a run, as a user gets it: one bar per phase, log lines above the bars, quiet libraries.

A tiny SFT→RL run is started through deploy.py with stdout/stderr captured exactly as a terminal would receive
them (tqdm writes its frames with carriage returns; we split on them the way a terminal overwrites a line).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_config
from integration_training.config import to_json
from integration_training.console import format_values

REPO = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")
BAR = re.compile(r"^(?P<desc>[^\r\n]*?): +\d+%\|")  # "desc:  40%|####      | 2/5 ..."
RAW_DICT = re.compile(r"\{\s*['\"][^'\"]+['\"]\s*:")


def _run_tiny(tmp_path: Path, log_level: str) -> subprocess.CompletedProcess:
    config = make_config(tmp_path, output={"mode": "sft+rl", "log_level": log_level})
    path = tmp_path / "cfg.py"
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), str(path)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def _segments(text: str) -> list[str]:
    """What a terminal shows one after another: lines split on newlines and on the carriage returns tqdm redraws with."""
    return [s for line in text.split("\n") for s in line.split("\r") if s.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("console")
    result = _run_tiny(tmp_path, "INFO")
    assert result.returncode == 0, result.stderr[-4000:]
    return result, tmp_path


def test_every_phase_has_a_progress_bar_that_completes(tiny_run):
    result, _ = tiny_run
    finished = {m["desc"] for s in _segments(result.stderr) if (m := BAR.match(s)) and "100%|" in s}
    # baseline evaluation, SFT steps, the after-SFT evaluation, RL steps, the after-RL evaluation
    assert {"baseline eval @ step 0", "sft", "sft eval @ step 4", "rl", "rl eval @ step 2"} <= finished, finished
    evaluation = [s for s in _segments(result.stderr) if s.startswith("baseline eval @ step 0:") and "100%|" in s]
    assert "problems" in evaluation[-1] and "problems/s" in evaluation[-1], evaluation[-1]


def test_log_lines_start_their_own_line_never_inside_a_bar(tiny_run):
    result, _ = tiny_run
    logged = [s for s in _segments(result.stderr) if re.search(r" (INFO|WARNING) ", s)]
    assert len(logged) >= 5, result.stderr[-3000:]
    for segment in logged:
        assert TIMESTAMP.match(segment), f"log text glued to something else: {segment!r}"


def test_no_third_party_bars_or_raw_dicts_at_the_default_level(tiny_run):
    result, _ = tiny_run
    ours = ("baseline eval", "sft", "rl", "rl eval")
    for segment in _segments(result.stderr) + _segments(result.stdout):
        bar = BAR.match(segment)
        assert bar is None or bar["desc"].startswith(ours), f"a bar that is not ours: {segment!r}"
        assert not re.search(r"it/s\]|Loading weights|Writing model shards|Map:", segment), segment
        assert not RAW_DICT.search(segment), f"a raw dict on the console: {segment!r}"


def test_closing_block_names_table_wall_times_and_report(tiny_run):
    result, tmp_path = tiny_run
    tail = result.stdout[result.stdout.index("== finished: "):]
    for fragment in ("baseline", "wall time per phase:", "SFT:", "baseline evaluation:", "total:", "report: ",
                     "full log: "):
        assert fragment in tail, tail
    report = Path(re.search(r"report: (\S+)", tail)[1])
    assert report.is_file()
    # train.log keeps the full record, with the evaluation metrics as name=value text
    log = (report.parent / "train.log").read_text()
    assert re.search(r"baseline evaluation: eval/num_problems=4 eval/\S+=\S+", log), log[-2000:]


def test_debug_level_lets_the_libraries_through(tmp_path):
    """The filter is what hides them: at DEBUG, third-party records reach the console handler."""
    from integration_training.console import console_handler

    records = []
    handler = console_handler("DEBUG", is_main=True)
    handler.emit = records.append  # type: ignore[method-assign]
    quiet = console_handler("INFO", is_main=True)
    for name in ("transformers.modeling_utils", "py.warnings", "integration_training.sft"):
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, "message", None, None)
        handler.handle(record)
        assert quiet.filter(record) == name.startswith("integration_training"), name
    assert len(records) == 3


@pytest.mark.parametrize("values,expected", [
    ({"eval/pass@1_strict": 0.123456, "n": 3}, "eval/pass@1_strict=0.1235 n=3"),
    ({"loss": 1e-7, "lr": 2.5e-5}, "loss=1e-07 lr=2.5e-05"),
    ({}, ""),
])
def test_format_values_is_name_equals_value(values, expected):
    assert format_values(values) == expected
    assert not RAW_DICT.search(format_values(values))


@pytest.mark.parametrize("max_new_tokens,batch_size,greedy", [(0, 4, True), (1, 3, False), (6, 5, True), (6, 64, False)])
def test_evaluation_progress_adds_up_to_the_problems(max_new_tokens, batch_size, greedy):
    """The hook the evaluation bar rides on: fractions while decoding, summing to exactly the problems scored."""
    import torch

    from helpers import arithmetic, smollm2_tokenizer, tiny_model
    from integration_training.data import build_mixture
    from integration_training.evaluate import Scoring, evaluate

    tokenizer = smollm2_tokenizer()
    examples = list(build_mixture([arithmetic("test", 7)], 0).examples)
    calls: list[float] = []
    torch.manual_seed(0)
    scoring = Scoring(num_samples=2, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, batch_size=batch_size,
                      seed=0, greedy=greedy, tools=())
    result = evaluate(tiny_model(len(tokenizer), 0), tokenizer, examples, scoring, progress=calls.append)
    assert result.num_problems == 7
    assert sum(calls) == pytest.approx(7.0)
    assert all(c >= -1e-9 for c in calls)
    if max_new_tokens > 1:
        assert len(calls) > -(-7 * (2 + int(greedy)) // batch_size), "updates during a chunk, not only at its end"
