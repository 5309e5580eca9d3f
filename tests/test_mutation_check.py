"""tools/mutation_check.py stays runnable: every fault's snippet is found exactly once and names existing tests.

Running the faults is CI's job (`.ci/run` draws a subset; `--all` on demand); this only catches drift early, when
a change to the code moves a snippet the check plants its fault into.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import mutation_check  # noqa: E402


def test_there_are_at_least_25_distinct_faults():
    names = [f.name for f in mutation_check.FAULTS]
    assert len(names) >= 25 and len(set(names)) == len(names)
    assert all(f.original != f.replacement and f.tests for f in mutation_check.FAULTS)


def test_every_snippet_is_found_exactly_once():
    drifted = []
    for fault in mutation_check.FAULTS:
        count = (ROOT / fault.file).read_text().count(fault.original)
        if count != 1:
            drifted.append(f"{fault.name}: found {count}× in {fault.file}")
    assert not drifted, (
        "tools/mutation_check.py faults no longer anchor in the code (re-anchor each to the current code with the same "
        "meaning, then run `.venv/bin/python tools/mutation_check.py --only NAME`): " + "; ".join(drifted)
    )


def test_every_named_test_exists():
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                defined.add(f"tests/{path.name}::{node.name}")
    unknown = sorted({t for f in mutation_check.FAULTS for t in f.tests if t not in defined})
    assert not unknown, f"tools/mutation_check.py names tests that do not exist: {unknown}"


def test_a_planted_fault_changes_only_the_copy(tmp_path):
    fault = mutation_check.FAULTS[0]
    mutation_check.copy_repo(tmp_path)
    before = (ROOT / fault.file).read_text()
    assert mutation_check.apply(fault, tmp_path) is None
    assert fault.replacement in (tmp_path / fault.file).read_text()
    assert (ROOT / fault.file).read_text() == before
    missing = mutation_check.Fault("x", fault.file, "no such snippet ¤", "y", fault.tests, "drift")
    assert "found 0 times" in mutation_check.apply(missing, tmp_path)
