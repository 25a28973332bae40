"""What the training stages share around the library trainer: arguments, callbacks (metrics.jsonl, progress,
plots), the LM loss at trained positions, and the torchrun launcher."""
