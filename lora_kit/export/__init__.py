"""From adapters to deployable files: `merge` (hf or gguf, verified against base + adapters), `svd`, `extract-lora`,
sharing adapter reading, tensor-by-tensor safetensors I/O and logit verification."""
