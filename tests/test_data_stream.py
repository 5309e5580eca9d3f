"""Data at scale: packing, the epoch/step stream, the tokenised cache shared by processes, environment.json and
the resume fingerprint check (through deploy.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_config, smollm2_tokenizer
from integration_training import template
from integration_training.config import DatasetSpec, to_json
from integration_training.data import Example, build_mixture
from integration_training.data.packing import best_fit, best_fit_decreasing_rows, fill_ratio
from integration_training.data.prepared import example_bytes, prepare, row_key_text
from integration_training.data.stream import SFTStream
from integration_training.template import Rendered

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- packing


def reference_best_fit(lengths: list[int], capacity: int) -> list[int]:
    """The old linear scan: tightest open row, ties to the earliest."""
    free: list[int] = []
    rows = []
    for n in lengths:
        fitting = [i for i, room in enumerate(free) if room >= n]
        if fitting:
            best = min(fitting, key=lambda i: (free[i], i))
            free[best] -= n
        else:
            best = len(free)
            free.append(capacity - n)
        rows.append(best)
    return rows


def gsm8k_like_lengths(count: int, seed: int) -> np.ndarray:
    """Token counts shaped like GSM8K conversations under a chat template (roughly 120-400, right-skewed)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(200), 0.3, count).astype(np.int64), 60, 500)


@pytest.mark.parametrize("seed", range(6))
def test_bucketed_best_fit_equals_the_linear_scan(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 256])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 400))]
    assert best_fit(lengths, capacity).tolist() == reference_best_fit(lengths, capacity)


@pytest.mark.parametrize("seed", range(4))
def test_best_fit_decreasing_is_a_valid_packing_at_least_as_full_as_online_best_fit(seed):
    lengths = gsm8k_like_lengths(3000, seed)
    row_of_rank, sorted_lengths = best_fit_decreasing_rows(lengths, 1024)
    assert sorted(sorted_lengths.tolist()) == sorted(lengths.tolist())
    per_row = np.bincount(row_of_rank, weights=sorted_lengths)
    assert per_row.max() <= 1024 and (per_row > 0).all()
    online_rows = int(best_fit(lengths.tolist(), 1024).max()) + 1
    assert len(per_row) <= online_rows
    assert fill_ratio(lengths, len(per_row), 1024) >= 0.97  # the quality the old packer had on GSM8K


# ---------------------------------------------------------------------------------------------------- the stream


def fake_conversations(lengths: np.ndarray) -> list[Rendered]:
    # Each conversation's first token is its index, so rows can be traced back.
    return [Rendered(input_ids=[i] + [7] * (int(n) - 1), loss_mask=[0] + [1] * (int(n) - 1)) for i, n in enumerate(lengths)]


@pytest.mark.parametrize(("count", "packing", "per_step"), [(37, False, 4), (37, False, 37), (200, True, 3),
                                                            (200, True, 8), (500, True, 5)])
def test_steps_read_epochs_back_to_back_each_epoch_every_conversation_once(count, packing, per_step):
    lengths = gsm8k_like_lengths(count, count)
    stream = SFTStream(fake_conversations(lengths), seed=5, packing=packing, max_length=1024, sequences_per_step=per_step)
    rows = stream.rows_per_epoch
    epochs = 3
    steps = stream.steps_for_epochs(epochs)
    assert steps == epochs * rows // per_step and stream.partial_rows(epochs) == epochs * rows % per_step
    flat = [row for step in range(steps) for row in stream.step_conversations(step)]
    flat += [stream.epoch_conversations(epochs - 1)[p] for p in range(rows - stream.partial_rows(epochs), rows)]
    for epoch in range(epochs):  # global rows = epoch 0's rows, then epoch 1's ...: nothing dropped at epoch ends
        chunk = flat[epoch * rows : (epoch + 1) * rows]
        assert chunk == stream.epoch_conversations(epoch)
        assert sorted(i for row in chunk for i in row) == list(range(count))
        assert all(lengths[row].sum() <= 1024 for row in chunk)
    assert stream.epoch_conversations(0) != stream.epoch_conversations(1)
    brute = [e for e in range(epochs + 1) for _ in range(stream.steps_in_epoch(e))]
    for step in range(steps):
        epoch, index = stream.locate(step)
        assert epoch == brute[step] == step * per_step // rows and index == brute[:step].count(epoch)


def test_an_epoch_is_a_pure_function_of_seed_and_epoch_and_needs_no_earlier_epoch():
    lengths = gsm8k_like_lengths(300, 1)
    conversations = fake_conversations(lengths)
    walked = SFTStream(conversations, seed=2, packing=True, max_length=1024, sequences_per_step=4)
    for step in range(0, walked.steps_for_epochs(6)):
        walked.step_conversations(step)
    fresh = SFTStream(conversations, seed=2, packing=True, max_length=1024, sequences_per_step=4)
    late = walked.steps_for_epochs(5) + 3
    assert fresh.step_conversations(late) == walked.step_conversations(late)  # straight to epoch 5
    other_seed = SFTStream(conversations, seed=3, packing=True, max_length=1024, sequences_per_step=4)
    assert other_seed.step_conversations(late) != fresh.step_conversations(late)
    # Every epoch packs equally well: the rows' length profile is fixed, only who sits where changes.
    assert walked.rows_per_epoch == fresh.rows_per_epoch == other_seed.rows_per_epoch
    assert [len(r) for r in fresh.step_sequences(0)] and all(
        sum(len(c) for c in row) <= 1024 for row in fresh.step_sequences(late)
    )


# ---------------------------------------------------------------------------------------------------- the cache


def arithmetic(split: str, n: int) -> DatasetSpec:
    return DatasetSpec(name="arithmetic", split=split, subset=None, max_samples=n, repeat=1, path=None, reward=None)


@pytest.mark.parametrize("seed", range(4))
def test_example_bytes_is_the_json_with_every_character_as_is(seed):
    """The fast ASCII path must give the very bytes fingerprints were defined with (resume compares them)."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(128)] + ["é", "🐱", "\u2028", "\\u0041", "\\", '"']
    for _ in range(300):
        text = lambda: "".join(rng.choice(alphabet if rng.random() < 0.3 else "abc 12\n") for _ in range(rng.randint(1, 12)))  # noqa: E731
        example = Example(messages=({"role": "user", "content": text()}, {"role": "assistant", "content": text()}),
                          reference=rng.choice([None, text()]), reward=rng.choice([None, "gsm8k"]), source="s")
        expected = json.dumps([example.messages, example.reference, example.reward], ensure_ascii=False,
                              separators=(",", ":")).encode()
        assert example_bytes(example) == expected


def test_row_key_texts_tell_apart_rows_that_differ_in_any_field():
    """Rows built to collide in a naive concatenation: fields moved between messages, None vs "" vs "-", roles,
    sources, extra message keys (the JSON fallback). Every distinct row gets a distinct text, and no text is a prefix
    of another's concatenation with a following row (the key hashes them back to back)."""
    def row(messages, reference=None, reward=None, source="s"):
        return Example(messages=tuple(messages), reference=reference, reward=reward, source=source)

    u = lambda text: {"role": "user", "content": text}  # noqa: E731
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    rows = [row([u("ab"), a("c")]), row([u("a"), a("bc")]), row([u("a"), a("b"), u("c"), a("d")]),
            row([u("a"), a("b")], reference=""), row([u("a"), a("b")], reference="-"), row([u("a"), a("b")], reward=""),
            row([u("a"), a("b")], source="s2"), row([u("a"), a("b")], source="s,2"), row([u("1|a"), a("b")]),
            row([{"role": "system", "content": "a"}, u("x"), a("b")]), row([u("a"), {**a("b"), "name": "x"}]),
            row([u("a"), a("b")]), row([u("a"), a("b"), u("a"), a("b")]), row([u("a"), a("b")], reference="12")]
    texts = [row_key_text(r) for r in rows]
    assert len(set(texts)) == len(rows)
    singles = {texts[i] for i in range(len(rows))}
    pairs = {texts[i] + texts[j] for i in range(len(rows)) for j in range(len(rows))}
    assert not singles & pairs and len(pairs) == len(rows) ** 2


def test_prepared_cache_equals_rendering_and_a_second_prepare_maps_it(tmp_path):
    tokenizer = smollm2_tokenizer()
    examples = build_mixture([arithmetic("train", 24)], seed=0).examples
    long = Example(messages=({"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}),
                   reference=None, reward=None, source="long")
    examples = [*examples[:10], long, *examples[10:]]
    first = prepare(tokenizer, examples, 128, tmp_path)
    expected, report = template.render_examples(tokenizer, examples, 128)
    assert first.prepared_here and first.report == report and report.dropped == 1
    assert len(first) == len(expected) == 24
    assert [first[i] for i in range(len(first))] == expected
    assert first.lengths.tolist() == [len(r) for r in expected]
    second = prepare(tokenizer, examples, 128, tmp_path)
    assert not second.prepared_here and second.key == first.key
    assert [second[i] for i in range(len(second))] == expected
    changed = [dataclasses.replace(examples[0], reference="other"), *examples[1:]]
    assert prepare(tokenizer, changed, 128, tmp_path).key != first.key  # any row change is a new key
    assert prepare(tokenizer, examples, 256, tmp_path).key != first.key
    uses = (tmp_path / "prepared" / f"{first.key}.uses").read_text().split()
    assert uses[1::2] == ["prepared", "mapped"]


# ---------------------------------------------------------------------------------------------------- deploy.py


def child_env(cache: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
                INTEGRATION_TRAINING_CACHE=str(cache))


def deploy(config_file: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), str(config_file), *args], env=child_env(cache),
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def write_config(path: Path, config) -> Path:
    path.write_text(f"from integration_training.config import from_json\nconfig = from_json(r'''{to_json(config)}''')\n")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two gloo processes (~17 s on 2 loaded cores); one process preparing and mapping is tested above
def test_two_gloo_processes_prepare_once_and_the_other_maps(tmp_path):
    config = make_config(tmp_path, target=dict(processes_per_node=2, parallelism="ddp", master_port=free_port()),
                         sft=dict(num_iterations=2))
    done = deploy(write_config(tmp_path / "cfg.py", config), tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    uses = sorted((tmp_path / "cache" / "prepared").glob("*.uses"))
    assert len(uses) == 2  # the training and the validation mixture
    for path in uses:
        lines = [line.split() for line in path.read_text().splitlines()]
        assert sorted(how for _, how in lines) == ["mapped", "prepared"], lines
        assert len({pid for pid, _ in lines}) == 2  # two processes: one tokenised, the other waited and mapped


def write_conversations(path: Path, count: int, salt: str) -> Path:
    rows = [[{"role": "user", "content": f"Say the word number {i}{salt}."},
             {"role": "assistant", "content": f"Word {i}: {'ab' * (i % 5 + 1)}."}] for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow  # 29 s, three deploy.py runs; test_resume_compares_every_recorded_fingerprint is its unit test
def test_resume_refuses_an_edited_custom_json_and_resumes_bitwise_when_unchanged(tmp_path):
    data = write_conversations(tmp_path / "mine.jsonl", 16, "")
    spec = DatasetSpec(name="custom_json", split="train", subset=None, max_samples=None, repeat=1, path=str(data),
                       reward=None)
    config = make_config(tmp_path, data=dict(sft_mixture=[spec]), output=dict(mode="sft+rl"),
                         sft=dict(num_iterations=4, checkpoint_every=2, packing=True, batch_size=2, examples_per_step=2))
    config_file = write_config(tmp_path / "cfg.py", config)
    cache = tmp_path / "cache"
    done = deploy(config_file, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    run = config.output.save_dir / config.output.experiment_name
    record = json.loads((run / "environment.json").read_text())
    assert record["seed"] == 0 and record["packages"]["torch"] and record["project"]["commit"]
    assert {"python", "packages", "cuda", "devices", "project", "template_date"} <= set(record)
    sft = record["stages"]["sft"]
    assert set(sft["sources"]) == {"custom_json(mine.jsonl)/train"} and len(sft["tokenizer_sha256"]) == 64
    assert set(record["stages"]["rl"]["sources"]) == {"arithmetic/train"}  # RL records its data too
    final = run / "checkpoints" / "sft" / "step_000004"
    uninterrupted = load_file(str(final / "model.safetensors"))
    shutil.rmtree(final)  # as if killed after the step-2 checkpoint
    shutil.rmtree(run / "checkpoints" / "rl")

    original = data.read_text()
    data.write_text(original.replace("number 3.", "number three."))
    refused = deploy(config_file, cache, "--resume")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and str(data) in refused.stderr and "changed" in refused.stderr
    assert not final.exists()

    data.write_text(original)
    resumed = deploy(config_file, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(str(final / "model.safetensors"))
    assert again.keys() == uninterrupted.keys() and all(torch.equal(again[k], uninterrupted[k]) for k in again)
    # The refused resume stopped before tokenising; the good one mapped the cache instead of tokenising again.
    uses = [line.split()[1] for path in (cache / "prepared").glob("*.uses") for line in path.read_text().splitlines()]
    assert uses.count("prepared") == 2 and "mapped" in uses


@pytest.mark.parametrize("change, fragment", [
    (("sources", "mine", "b" * 64), "data source mine (/data/mine.jsonl) changed"),
    (("sources", "new", "c" * 64), "data source new is new"),
    (("val_sources", "held", None), "data source held is gone"),
    (("tokenizer_sha256", None, "d" * 64), "tokenizer changed"),
    (("chat_template_sha256", None, "e" * 64), "chat template changed"),
    (("max_length", None, 512), "max length changed"),
])
def test_resume_compares_every_recorded_fingerprint(tmp_path, change, fragment):
    """provenance.record_stage: a fresh start records; a resume with the same fingerprints passes; any change is
    refused (UserError → exit 2) naming what changed, with the local file's path where there is one."""
    import copy

    from integration_training import provenance
    from integration_training.errors import UserError

    fingerprints = {"sources": {"mine": "a" * 64}, "val_sources": {"held": "f" * 64}, "tokenizer_sha256": "1" * 64,
                    "chat_template_sha256": "2" * 64, "max_length": 256}
    paths = {"mine": "/data/mine.jsonl"}
    provenance.record_stage(tmp_path, "sft", 0, fingerprints, False, paths, True)
    provenance.record_stage(tmp_path, "sft", 0, copy.deepcopy(fingerprints), True, paths, True)  # unchanged: resumes
    changed = copy.deepcopy(fingerprints)
    group, label, value = change
    if label is None:
        changed[group] = value
    elif value is None:
        del changed[group][label]
    else:
        changed[group][label] = value
    with pytest.raises(UserError, match="--resume") as refused:
        provenance.record_stage(tmp_path, "sft", 0, changed, True, paths, True)
    assert fragment in str(refused.value), str(refused.value)


def test_a_large_preparation_renders_in_a_process_pool_with_identical_output(tmp_path, monkeypatch):
    from integration_training.data import prepared as prepared_module

    monkeypatch.setattr(prepared_module, "POOL_THRESHOLD", 8)
    monkeypatch.setattr(prepared_module, "CHUNK", 7)  # several chunks per worker, the last one short
    monkeypatch.setattr(prepared_module.os, "cpu_count", lambda: 2)
    tokenizer = smollm2_tokenizer()
    examples = list(build_mixture([arithmetic("train", 40)], seed=1).examples)
    long = Example(messages=({"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}),
                   reference=None, reward=None, source="long")
    examples[8:8] = [long]  # dropped from the middle of the second chunk
    pooled = prepare(tokenizer, examples, 256, tmp_path)
    expected, report = template.render_examples(tokenizer, examples, 256)
    assert pooled.prepared_here and pooled.report == report and report.dropped == 1
    assert [pooled[i] for i in range(len(pooled))] == expected


@pytest.mark.parametrize("chunks,in_flight", [(0, 1), (1, 1), (5, 1), (5, 3), (17, 8), (3, 8)])
def test_the_pool_gets_a_bounded_number_of_chunks_ahead_and_results_come_in_order(chunks, in_flight):
    """Pool.imap pickled and queued the whole input at once (500K conversations: 4.5 GiB peak RSS); submission is
    now bounded: never more than `in_flight` chunks handed out and not yet written, and the output order is the
    input's whatever order the workers finish in."""
    from integration_training.data import prepared as prepared_module

    class Result:
        def __init__(self, pool, payload):
            self.pool, self.payload = pool, payload

        def get(self):
            self.pool.outstanding -= 1
            return ("rendered", self.payload)

    class FakePool:
        outstanding = most = 0

        def apply_async(self, function, args):
            assert function is prepared_module._worker_render
            self.outstanding += 1
            self.most = max(self.most, self.outstanding)
            return Result(self, args[0])

    pool = FakePool()
    items = [[SimpleNamespace(messages=(f"chunk {c} row {r}",)) for r in range(2)] for c in range(chunks)]
    consumed = 0

    def source():
        nonlocal consumed
        for item in items:
            consumed += 1
            yield item

    out = []
    for chunk, rendered in prepared_module.bounded_in_order(pool, source(), in_flight):
        assert consumed - len(out) <= in_flight  # the input is read lazily too
        out.append((chunk, rendered))
    assert [c for c, _ in out] == items
    assert [r for _, r in out] == [("rendered", [e.messages for e in item]) for item in items]
    assert pool.most <= in_flight and pool.outstanding == 0


def test_the_tokenising_workers_import_no_torch():
    """A spawned worker imports data/prepared.py (and the template module); with torch one measured 276 MiB RSS."""
    code = "import sys, integration_training.data.prepared; print(sorted(m for m in sys.modules if m == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_templates_get_the_fixed_date_instead_of_today():
    class RecordingTokenizer:
        chat_template = "{{ date_string }}"
        seen: dict = {}

        def apply_chat_template(self, messages, **kwargs):
            self.seen.update(kwargs)
            return "text"

    tokenizer = RecordingTokenizer()
    template._template_text(tokenizer, [{"role": "user", "content": "hi"}], generation_prompt=True)
    assert tokenizer.seen["date_string"] == template.FIXED_DATE_STRING


def test_the_suite_caches_in_a_temporary_directory_and_links_the_users_model(tmp_path_factory):
    from integration_training import models

    root = models.cache_root()
    assert root.is_relative_to(tmp_path_factory.getbasetemp()), root  # conftest: nothing lands in ~/.cache
    if (root / "models").exists():  # the user's provisioned model, linked in (not converted again)
        assert (root / "models").is_symlink() and not (root / "models").resolve().is_relative_to(root)


def test_bench_data_rows_are_seeded_valid_conversations_of_the_stated_shape():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_data import synthetic_examples
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = synthetic_examples(400, seed=3)
    assert rows == synthetic_examples(400, seed=3) and rows != synthetic_examples(400, seed=4)
    for row in rows:
        roles = [m["role"] for m in row.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 8
        assert all(m["content"] and m["content"] == m["content"].strip() for m in row.messages)
    turns = np.bincount([len(r.messages) // 2 for r in rows], minlength=5)[1:]
    assert turns[0] > turns[1] > turns[2] > 0  # weighted to 1-2 exchanges
