"""Vocabulary extension (`lorakit extend-vocab`, `lorakit tokstats`): train Chinese pieces, merge them into a
SentencePiece or byte-level BPE tokenizer, check the result, and resize the model with sub-token-mean rows."""
