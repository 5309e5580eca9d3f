"""A generated corpus of bad configs, each run through `deploy.py --dry-run` as a user would.

The cases are derived from the schema (dataclass fields and their annotations), so a new field is covered without
touching this file: for every field of every section (and of a DatasetSpec) the shipped offline config is mutated
to a wrong type, an out-of-range value, NaN/±inf (float fields), a missing field and an unknown (misspelt) field.
A hand-written list adds the cross-field rules and the checks the dry run makes beyond the schema (dataset names,
procedural sizes, max_length fit, one RL step, the output location). Every case must exit 2 with an `error:` line
that names the field, and no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from integration_training import config as schema

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "00_offline_cpu.py"
SECTIONS = [f.name for f in dataclasses.fields(schema.Config)]
SPEC_AT = "data.sft_mixture[0]"  # the DatasetSpec mutated (an arithmetic source in the shipped config)

PRELUDE = f'''
import dataclasses, math, runpy
from pathlib import Path
from base_config import *

base = runpy.run_path({str(SHIPPED)!r})["config"]


def rebuild(obj, drop=None, add=None, **changes):
    kwargs = {{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != drop}}
    kwargs.update(changes)
    if add:
        kwargs[add] = kwargs.get(add.rstrip("x"), 1)
    return type(obj)(**kwargs)

'''


def _annotation_kind(annotation) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'Path' | 'list', optional)."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = True
    if typing.get_origin(annotation) is list:
        return "list", optional
    if dataclasses.is_dataclass(annotation):  # model.lora: LoRAConfig | None (its own fields: tests/test_lora.py)
        return "dataclass", optional
    return {int: "int", float: "float", bool: "bool", str: "str", Path: "Path"}[annotation], optional


ENUMERATED = {
    "device_type", "parallelism", "dtype", "attn_implementation", "optimizer", "lr_schedule", "advantage",
    "log_level", "mode",
}


def _wrong_type(kind: str) -> str:
    return {"int": "'3'", "float": "'0.1'", "bool": "1", "str": "5", "Path": "'results'", "list": "'x'",
            "dataclass": "'x'"}[kind]


def _out_of_range(field: str, kind: str) -> str | None:
    if kind == "int":
        return "-5"
    if kind == "float":
        return "-1.0"
    if kind == "str":
        return "'bogus'" if field in ENUMERATED else "''"
    if kind == "list":
        return {"gpu_ranks": "[-5]", "tools": "['bogus']"}.get(field, "[]")  # [] is valid for tools (none)
    if kind == "Path":
        return "Path('/dev/null/results')"  # a file in the way: the output location cannot be created
    return None  # bool: every value is in range


def _section_fields():
    """(where, schema class, field name, annotation) for every field of every section, of every nested section
    (sft.optimizer, rl.sampling, ...) and of a DatasetSpec."""

    def walk(where: str, cls):
        for name, annotation in typing.get_type_hints(cls).items():
            yield where, cls, name, annotation
            if dataclasses.is_dataclass(annotation):  # a required nested section (not `X | None` like model.lora)
                yield from walk(f"{where}.{name}", annotation)

    for section in SECTIONS:
        yield from walk(section, typing.get_type_hints(schema.Config)[section])
    for name, annotation in typing.get_type_hints(schema.DatasetSpec).items():
        yield SPEC_AT, schema.DatasetSpec, name, annotation


def _mutation(where: str, body: str) -> str:
    """Config source that applies `body` (keyword text for rebuild) to `where` (a section or a nested section)."""
    if where == SPEC_AT:
        return (f"spec = rebuild(base.data.sft_mixture[0], {body})\n"
                "config = rebuild(base, data=rebuild(base.data, sft_mixture=[spec] + base.data.sft_mixture[1:]))\n")
    parts = where.split(".")
    text = f"rebuild(base.{where}, {body})"
    for depth in range(len(parts) - 1, 0, -1):  # rebuild each enclosing section around the changed one
        text = f"rebuild(base.{'.'.join(parts[:depth])}, {parts[depth]}={text})"
    return f"config = rebuild(base, {parts[0]}={text})\n"


def generated_cases() -> list[tuple[str, str, str]]:
    """(id, config source, fragment the error must contain)."""
    cases = []
    for where, cls, name, annotation in _section_fields():
        kind, optional = _annotation_kind(annotation)
        path = f"{where}.{name}"
        cases.append((f"type:{path}", _mutation(where, f"{name}={_wrong_type(kind)}"), path))
        value = _out_of_range(name, kind)
        if value is not None and not (name == "wandb_project"):  # wandb_project may be empty without wandb
            cases.append((f"range:{path}", _mutation(where, f"{name}={value}"),
                          "output.save_dir" if kind == "Path" else path))
        if kind == "float":
            for special in ("math.nan", "math.inf", "-math.inf"):
                cases.append((f"{special.replace('math.', '')}:{path}", _mutation(where, f"{name}={special}"), path))
        if optional is False and kind in ("int", "float", "str"):
            cases.append((f"none:{path}", _mutation(where, f"{name}=None"), path))
        cases.append((f"missing:{path}", _mutation(where, f"drop={name!r}"), f"{cls.__name__}.{name}: missing"))
    for section in SECTIONS:
        cls = typing.get_type_hints(schema.Config)[section]
        first = dataclasses.fields(cls)[0].name
        cases.append((f"unknown:{section}", _mutation(section, f"add={first + 'x'!r}"),
                      f"{cls.__name__}.{first}x: unknown field"))
    return cases


def _spec(index: int, **changes) -> str:
    body = ", ".join(f"{k}={v}" for k, v in changes.items())
    return (f"spec = rebuild(base.data.sft_mixture[{index}], {body})\n"
            f"mix = list(base.data.sft_mixture); mix[{index}] = spec\n"
            "config = rebuild(base, data=rebuild(base.data, sft_mixture=mix))\n")


def _sections(**bodies: str) -> str:
    parts = ", ".join(f"{section}=rebuild(base.{section}, {body})" for section, body in bodies.items())
    return f"config = rebuild(base, {parts})\n"


CROSS_FIELD = [
    ("no-room-for-prompt", _sections(rl="sampling=rebuild(base.rl.sampling, max_new_tokens=250)"),
     "rl.sampling.max_new_tokens"),
    ("new-tokens-equal-length", _sections(evaluation="sampling=rebuild(base.evaluation.sampling, max_new_tokens=256)"),
     "evaluation.sampling.max_new_tokens"),
    ("two-processes-no-parallelism", _sections(target="processes_per_node=2"), "target.parallelism"),
    ("one-process-ddp", _sections(target="parallelism='ddp'"), "target.parallelism"),
    ("zero-processes", _sections(target="processes_per_node=0"), "target.processes_per_node"),
    ("zero-nodes", _sections(target="num_nodes=0"), "target.num_nodes"),
    ("indivisible-sft-step", _sections(sft="examples_per_step=6"), "sft.examples_per_step"),
    ("rl-prompts-over-ranks", _sections(target="processes_per_node=3, parallelism='ddp'"), "rl.examples_per_step"),
    ("rl-batch", _sections(rl="batch_size=7"), "rl.batch_size"),
    ("node-rank-past-nodes", _sections(target="node_rank=1"), "target.node_rank"),
    ("rl-without-source", _sections(output="mode='rl'"), "output.source_checkpoint"),
    ("sft-with-source", _sections(output="source_checkpoint='x'"), "output.source_checkpoint"),
    ("wandb-without-project", _sections(output="use_wandb=True, wandb_project=''"), "output.wandb_project"),
    ("subset-on-procedural", _spec(0, subset="'main'"), "data.sft_mixture[0].subset"),
    ("subset-on-custom-json", _spec(1, subset="'main'"), "data.sft_mixture[1].subset"),
    ("custom-json-without-path", _spec(1, path="None"), "data.sft_mixture[1].path"),
    ("procedural-split", _spec(0, split="'validation'"), "data.sft_mixture[0].split"),
    ("procedural-unbounded", _spec(0, max_samples="None"), "data.sft_mixture[0].max_samples"),
    ("procedural-with-path", _spec(0, path="'x.jsonl'"), "data.sft_mixture[0].path"),
    ("reward-not-module-function", _spec(0, reward="'gsm8k'"), "data.sft_mixture[0].reward"),
    ("all-lrs-zero", _sections(sft="optimizer=rebuild(base.sft.optimizer, embedding_lr=0.0, unembedding_lr=0.0, "
                                   "matrix_lr=0.0)"), "sft.optimizer.matrix_lr"),
    ("flash-attention-on-cpu", _sections(model="attn_implementation='flash_attention_2'"), "model.attn_implementation"),
    ("float16-on-cpu", _sections(model="dtype='float16'"), "model.dtype"),
    ("gpu-ids-on-cpu", _sections(target="gpu_ranks=[0]"), "target.gpu_ranks"),
    ("cuda-without-gpus", _sections(target="device_type='cuda'"), "target.gpu_ranks"),
    ("mps-two-processes", _sections(target="device_type='mps', processes_per_node=2, parallelism='ddp'"),
     "target.processes_per_node"),
    ("one-rl-sample", _sections(rl="num_samples=1"), "rl.num_samples"),
    ("zero-temperature", _sections(rl="sampling=rebuild(base.rl.sampling, temperature=0.0)"), "rl.sampling.temperature"),
    ("eval-zero-temperature", _sections(evaluation="sampling=rebuild(base.evaluation.sampling, temperature=0.0)"),
     "evaluation.sampling.temperature"),
    ("eval-after-rl-without-rl", _sections(output="mode='sft'"), "evaluation.after_rl"),
    ("eval-on-without-problems", _sections(evaluation="mixture=[]"), "evaluation.mixture"),
    ("clip-eps-one", _sections(rl="clip_eps=1.0"), "rl.clip_eps"),
    ("warmup-all", _sections(sft="optimizer=rebuild(base.sft.optimizer, warmup_ratio=1.0)"),
     "sft.optimizer.warmup_ratio"),
    ("num-iterations-zero", _sections(rl="num_iterations=0"), "rl.num_iterations"),
    ("no-rl-data-for-rl", _sections(data="rl_mixture=[]"), "data.rl_mixture"),
    ("experiment-name-path", _sections(output="experiment_name='a/b'"), "output.experiment_name"),
    ("experiment-name-dotdot", _sections(output="experiment_name='..'"), "output.experiment_name"),
    ("seed-too-large", _sections(data="shuffle_seed=2**64"), "data.shuffle_seed"),
    ("port-too-large", _sections(target="master_port=70000"), "target.master_port"),
    ("addr-with-space", _sections(target="master_addr='127.0.0.1 '"), "target.master_addr"),
    ("bool-as-int", _sections(target="num_nodes=True"), "target.num_nodes"),
    # Beyond the schema: what the dry run resolves (the real run refuses the same, with the same message).
    ("misspelt-procedural-name", _spec(0, name="'arithmatic'"), "did you mean 'arithmetic'"),
    ("misspelt-hub-name", _spec(0, name="'openai/gsm9k'", max_samples="None"), "did you mean 'openai/gsm8k'"),
    ("unknown-plain-name", _spec(0, name="'gsm8k'", max_samples="None"), "unknown dataset name 'gsm8k'"),
    ("procedural-more-than-exists", _spec(0, name="'arithmetic'", max_samples="10**6"), "more distinct problems"),
    ("word-problems-beyond-the-bound", _spec(0, name="'word_problems'", max_samples="10**7"), "more distinct problems"),
    ("missing-local-file", _spec(1, path="'configs/data/nope.jsonl'"), "nope.jsonl"),
    ("nothing-fits-max-length", _sections(data="max_length=40", rl="sampling=rebuild(base.rl.sampling, max_new_tokens=8)",
                                          evaluation="sampling=rebuild(base.evaluation.sampling, max_new_tokens=8)"),
     "data.max_length=40"),
    ("rl-smaller-than-one-step",
     "spec = rebuild(base.data.rl_mixture[0], max_samples=4)\n"
     "config = rebuild(base, data=rebuild(base.data, rl_mixture=[spec]), rl=rebuild(base.rl, num_iterations=-1))\n",
     "fewer than one step"),
    ("sft-step-larger-than-data", _sections(sft="batch_size=4, examples_per_step=400"),
     "sft.examples_per_step"),
    ("save-dir-under-a-file", _sections(output="save_dir=Path('configs/00_offline_cpu.py/out')"), "output.save_dir"),
]

CASES = generated_cases() + [(f"cross:{name}", body, fragment) for name, body, fragment in CROSS_FIELD]


def run_deploy(config_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), str(config_path), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_corpus_is_broad():
    """>= 100 cases, touching every field of every section (and of a DatasetSpec) at least three ways."""
    assert len(CASES) >= 100
    for where, _, name, _ in _section_fields():
        touched = [case for case in CASES if case[0].endswith(f":{where}.{name}")]
        assert len(touched) >= 2, f"{where}.{name} has only {len(touched)} case(s)"


def _check(case_id: str, returncode: int, stdout: str, stderr: str, fragment: str) -> None:
    assert returncode == 2, (case_id, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr
    assert stderr.startswith("error: "), stderr
    assert fragment in stderr, (fragment, stderr)


@pytest.mark.parametrize("case_id, body, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, monkeypatch, case_id, body, fragment):
    """Every case through deploy.py's `main` in this process (the interpreter start is the only difference)."""
    from integration_training import cli

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "bad.py"
    path.write_text(PRELUDE + body)
    code = cli.main([str(path), "--dry-run"])
    captured = capsys.readouterr()
    _check(case_id, code, captured.out, captured.err, fragment)


# One case of each class (the last generated one: a DatasetSpec field or a section's unknown field) through a real
# `python deploy.py` process: the exit status and stderr as a shell sees them.
SUBPROCESS_CASES = list({c[0].split(":")[0]: c for c in CASES}.values())


@pytest.mark.parametrize("case_id, body, fragment", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_config_through_deploy_py(tmp_path, case_id, body, fragment):
    path = tmp_path / "bad.py"
    path.write_text(PRELUDE + body)
    result = run_deploy(path)
    _check(case_id, result.returncode, result.stdout, result.stderr, fragment)


def test_all_sections_reported_at_once(tmp_path):
    """A missing field, an unknown field, a wrong type and range errors in four sections: one message, all named."""
    path = tmp_path / "many.py"
    path.write_text(PRELUDE + (
        "config = rebuild(base, target=rebuild(base.target, drop='master_port'), "
        "model=rebuild(base.model, add='namex'), sft=rebuild(base.sft, batch_size='2', eval_every=0), "
        "rl=rebuild(base.rl, clip_eps=math.nan, sampling=rebuild(base.rl.sampling, top_k=-1)))\n"))
    result = run_deploy(path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in ("TargetConfig.master_port: missing", "ModelConfig.namex: unknown", "sft.batch_size: expected",
                     "sft.eval_every: must be >= 1", "rl.clip_eps: must be a finite", "rl.sampling.top_k: must be >= 0"):
        assert fragment in result.stderr, (fragment, result.stderr)
    assert f"{path}:" in result.stderr  # construction problems carry file:line


def test_problems_of_wrong_type_fields_are_not_doubled():
    base = schema.from_json(schema.to_json(_shipped()))
    bad = dataclasses.replace(base, target=dataclasses.replace(base.target, processes_per_node="2"))
    found = schema.problems(bad)
    assert [p for p in found if p.startswith("target.processes_per_node")] == [
        "target.processes_per_node: expected an integer, got '2'"]


def _shipped():
    import runpy

    return runpy.run_path(str(SHIPPED))["config"]
