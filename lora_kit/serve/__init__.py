"""Using a trained model: `lorakit chat` (streaming, with the training template)."""
