"""`lorakit eval`: how good a model or adapter is, on held-out tasks (exact match) and text (bits per character)."""
