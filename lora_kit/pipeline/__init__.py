"""`lorakit pipeline`: the whole path from a base model to a verified Chinese model as one cached, resumable command
(`plan` resolves and fingerprints the stages, `run` executes them, `report` writes OUT/report.md and .html)."""
