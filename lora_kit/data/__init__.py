"""Data in, tokens out: read and validate records (SFT, preference pairs, prompts, raw text), render them with a
template into assistant-only labels, pack rows; the bundled Chinese tasks and `lorakit data check`."""
