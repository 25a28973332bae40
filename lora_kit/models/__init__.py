"""Models: resolve names and the embedded default, load with dtype/quantization from safetensors, attach LoRA and
trainable token rows, memory tuning around loading, and `lorakit estimate`."""
