"""Checkpoint formats in and out: Hugging Face directories, GGUF."""
