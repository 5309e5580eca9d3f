"""Tokenised conversations prepared once per machine and memory-mapped by every process.

Key: a fingerprint of (the rows actually used, in mixture order; the tokenizer; its chat template; max_length;
the rendering version). Layout of `{cache}/prepared/{key}/`:
  ids.bin     int32 (native order), every kept conversation's token ids back to back
  mask.bin    uint8, the matching assistant-only loss mask
  offsets.npy int64, n + 1 boundaries (conversation i is ids[offsets[i]:offsets[i+1]])
  meta.json   counts per source (the length report), the fingerprints, who prepared it
One process per machine prepares under an exclusive `fcntl` lock on `{key}.lock`; the others block on that lock
and then find the finished directory. Every use appends "pid prepared|mapped" to `{key}.uses` (under the lock),
so which process tokenised is on record. The directory is written under a temp name and `os.replace`d, so a crash
mid-write never leaves something that looks prepared; a second run or a resume maps it without tokenising.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from integration_training.data.types import Example
from integration_training.template import LengthReport, Rendered, SourceLengths, render_conversation_arrays

logger = logging.getLogger(__name__)

# Bump when rendering or the layout changes: old cache entries then stop matching instead of being misread.
RENDER_VERSION = "render-v1"


# ---------------------------------------------------------------------------------------------------- fingerprints


def example_bytes(example: Example) -> bytes:
    """A canonical encoding of everything about a row that training or a verifier reads: its JSON with
    `ensure_ascii=False`. The `ensure_ascii=True` encoder is twice as fast here (hashing 500K rows for the cache key
    and the fingerprints) and writes the same text unless it escapes a character as `\\uXXXX` where the other
    writes it as is (non-ASCII, DEL); so its text is kept when it holds no `\\u` at all."""
    row = [example.messages, example.reference, example.reward]
    text = json.dumps(row, ensure_ascii=True, separators=(",", ":"))
    if "\\u" in text:
        text = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
    return text.encode()


def source_fingerprints(examples: Sequence[Example]) -> dict[str, str]:
    """Per source label: sha256 over its rows actually used (after sampling and repeat), in mixture order."""
    hashers: dict[str, Any] = {}
    for example in examples:
        hashers.setdefault(example.source, hashlib.sha256()).update(example_bytes(example) + b"\n")
    return {source: h.hexdigest() for source, h in hashers.items()}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser, special tokens) and of its template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": hashlib.sha256((body + special).encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }


def preparation_key(examples: Sequence[Example], tokenizer: dict[str, str], max_length: int,
                    tools: Sequence[str] = ()) -> str:
    # Tools change the rendering (forced spans tokenised apart, mask 0); [] leaves the key as it was before tools.
    tools_part = f"tools={','.join(tools)}/" if tools else ""
    digest = hashlib.sha256(f"{RENDER_VERSION}/{max_length}/{tokenizer['tokenizer_sha256']}/"
                            f"{tokenizer['chat_template_sha256']}/{tools_part}".encode())
    for example in examples:  # mixture order matters: it is the order of the prepared conversations
        digest.update(row_key_text(example).encode())
    return digest.hexdigest()[:32]


def row_key_text(example: Example) -> str:
    """A self-delimiting, injective text of a row and its source label, for the cache key: the fields' lengths,
    then the fields. Three times cheaper than its JSON (a cached run over 500K rows hashes them all
    before it can map anything). Rows whose messages are not plain {role, content} strings fall back to the JSON."""
    optional = (example.reference, example.reward)
    plain = all(isinstance(value, str) or value is None for value in optional) and all(
        len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str for m in example.messages)
    if plain:
        fields = ["messages", example.source, *("-" if v is None else "+" + v for v in optional),
                  *(text for m in example.messages for text in (m["role"], m["content"]))]
    else:
        fields = ["json", example.source, example_bytes(example).decode()]
    # The lengths first (they say where each field ends), then the fields back to back: one copy of the text.
    return ",".join([str(len(field)) for field in fields]) + "|" + "".join(fields)


# ---------------------------------------------------------------------------------------------------- the arrays


@dataclass(frozen=True)
class PreparedConversations(Sequence[Rendered]):
    """The kept conversations as memory-mapped arrays; indexing builds one `Rendered` on demand."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    report: LengthReport
    key: str
    prepared_here: bool  # this process tokenised (False: mapped what another run or process prepared)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return Rendered(input_ids=self.ids[start:end].tolist(), loss_mask=self.mask[start:end].tolist())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class Chunk:
    """Consecutive conversations rendered: token ids and mask back to back, and each conversation's length."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8
    lengths: np.ndarray  # int64, one per conversation of the chunk, kept or not


def render_chunk(tokenizer: Any, messages: Sequence, tools: Sequence[str]) -> Chunk:
    """`template.render_conversation_arrays` of one chunk, back to back (what a pool worker sends back)."""
    rendered = render_conversation_arrays(tokenizer, messages, tools)
    lengths = np.fromiter((len(ids) for ids, _ in rendered), dtype=np.int64, count=len(rendered))
    if not rendered:
        return Chunk(ids=np.zeros(0, np.int32), mask=np.zeros(0, np.uint8), lengths=lengths)
    return Chunk(ids=np.concatenate([ids for ids, _ in rendered]), mask=np.concatenate([m for _, m in rendered]),
                 lengths=lengths)


def _write_arrays(folder: Path, chunks: Iterator[tuple[Sequence[Example], Chunk]], max_length: int,
                  stats: dict[str, list[int]]) -> int:
    """Stream the kept conversations of each chunk into ids/mask files (never all in memory); returns how many.
    Conversations over `max_length` tokens are dropped and counted in `stats` (source → total, kept, too_long,
    longest)."""
    offsets = [np.zeros(1, dtype=np.int64)]
    end = 0
    with (folder / "ids.bin").open("wb") as ids_file, (folder / "mask.bin").open("wb") as mask_file:
        for examples, chunk in chunks:
            assert len(examples) == len(chunk.lengths)
            keep = chunk.lengths <= max_length
            for example, length, kept in zip(examples, chunk.lengths.tolist(), keep.tolist(), strict=True):
                row = stats.setdefault(example.source, [0, 0, 0, 0])
                row[0] += 1
                row[1 if kept else 2] += 1
                row[3] = max(row[3], length)
            token_keep = np.repeat(keep, chunk.lengths)
            ids_file.write(chunk.ids[token_keep].tobytes())
            mask_file.write(chunk.mask[token_keep].tobytes())
            offsets.append(end + np.cumsum(chunk.lengths[keep]))
            end = int(offsets[-1][-1]) if len(offsets[-1]) else end
    offsets_array = np.concatenate(offsets)
    np.save(folder / "offsets.npy", offsets_array)
    return len(offsets_array) - 1


# Below this many conversations a worker pool costs more (spawning, importing the tokenizer) than it saves.
POOL_THRESHOLD = 4096
# Chunks handed to the pool ahead of the one being written, per worker: enough to keep every worker busy, few
# enough that the parent never holds more than a few chunks of pickled messages (Pool.imap pickled and queued the
# whole input at once: 500K conversations peaked at 4.5 GiB RSS).
IN_FLIGHT_PER_WORKER = 4
# Conversations per task: one `render_conversation_arrays` call (batched template and tokeniser calls) each.
CHUNK = 1024
_worker_tokenizer: Any = None
_worker_tools: tuple[str, ...] = ()


def _worker_init(tokenizer: Any, tools: Sequence[str]) -> None:
    global _worker_tokenizer, _worker_tools
    _worker_tokenizer, _worker_tools = tokenizer, tuple(tools)


def _worker_render(messages: Sequence) -> Chunk:
    return render_chunk(_worker_tokenizer, messages, _worker_tools)


def _chunks(examples: Sequence[Example]) -> Iterator[Sequence[Example]]:
    for start in range(0, len(examples), CHUNK):
        yield examples[start : start + CHUNK]


@contextlib.contextmanager
def _renderer(tokenizer: Any, count: int, tools: Sequence[str]):
    """Yields map(chunks of examples) → (chunk, Chunk) iterator, in order: a pool over the CPUs for large inputs.

    Template rendering and the mask are per-conversation Python, so processes are what scales them (the Rust
    tokenizer also spreads each batch over threads); 'spawn' because the parent may hold torch threads and a
    tokenizer that must not be forked. Workers get messages and send back compact arrays, not Python lists.
    """
    workers = min(os.cpu_count() or 1, 32)
    if count < POOL_THRESHOLD or workers == 1:
        yield lambda chunks: ((c, render_chunk(tokenizer, [e.messages for e in c], tools)) for c in chunks)
        return
    import multiprocessing

    logger.info("data: tokenising %d conversations with %d processes", count, workers)
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(tokenizer, tuple(tools))) as pool:

        yield lambda chunks: bounded_in_order(pool, chunks, IN_FLIGHT_PER_WORKER * workers)


def bounded_in_order(pool: Any, chunks: Iterator[Sequence[Example]], in_flight: int) -> Iterator[tuple[Sequence[Example], Chunk]]:
    """(chunk, rendered chunk) in input order, with at most `in_flight` chunks submitted and not yet yielded."""
    assert in_flight >= 1, in_flight
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_worker_render, ([e.messages for e in chunk],))))
        if len(pending) >= in_flight:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())


def _prepare_into(folder: Path, tokenizer: Any, examples: Sequence[Example], max_length: int, meta: dict,
                  tools: Sequence[str]) -> None:
    stats: dict[str, list[int]] = {}
    started = time.perf_counter()
    with _renderer(tokenizer, len(examples), tools) as render:
        kept = _write_arrays(folder, render(_chunks(examples)), max_length, stats)
    meta["sources"] = [[source, *values] for source, values in stats.items()]
    meta["kept"] = kept
    meta["prepare_seconds"] = round(time.perf_counter() - started, 3)
    meta["prepared_by_pid"] = os.getpid()
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    _fsync_tree(folder)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # blocks while another process prepares
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _note_use(path: Path, how: str) -> None:
    with path.open("a") as handle:
        handle.write(f"{os.getpid()} {how}\n")


def _map(path: Path, dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty array is the same thing for every reader here.
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)


def _load(folder: Path, key: str, prepared_here: bool) -> PreparedConversations:
    meta = json.loads((folder / "meta.json").read_text())
    report = LengthReport(meta["max_length"], tuple(SourceLengths(*row) for row in meta["sources"]))
    offsets = np.load(folder / "offsets.npy")
    ids, mask = (_map(folder / name, dtype) for name, dtype in (("ids.bin", np.int32), ("mask.bin", np.uint8)))
    assert len(offsets) == meta["kept"] + 1 and offsets[-1] == len(ids) == len(mask), f"{folder} is inconsistent"
    return PreparedConversations(ids=ids, mask=mask, offsets=offsets, report=report, key=key, prepared_here=prepared_here)


def prepare(tokenizer: Any, examples: Sequence[Example], max_length: int, cache_dir: Path,
            tools: Sequence[str] = ()) -> PreparedConversations:
    """Tokenise `examples` into `cache_dir/prepared/{key}` unless present; return the memory-mapped result.

    `tools` is `data.tools` (rendering with forced tool spans unsupervised; part of the key when non-empty)."""
    assert max_length > 0
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = preparation_key(examples, fingerprint, max_length, tools)
    root = Path(cache_dir) / "prepared"
    folder = root / key
    with _exclusive(root / f"{key}.lock"):
        if (folder / "meta.json").is_file():
            _note_use(root / f"{key}.uses", "mapped")
            logger.info("data: mapped prepared conversations %s (tokenised earlier, not again)", folder)
            return _load(folder, key, prepared_here=False)
        staging = root / f".tmp-{key}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        meta = {"key": key, "render_version": RENDER_VERSION, "max_length": max_length, "rows": len(examples),
                **fingerprint}
        try:
            _prepare_into(staging, tokenizer, examples, max_length, meta, tools)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _note_use(root / f"{key}.uses", "prepared")
        logger.info("data: tokenised %d conversations into %s in %.1f s (other processes map it)",
                    len(examples), folder, json.loads((folder / "meta.json").read_text())["prepare_seconds"])
        return _load(folder, key, prepared_here=True)
