"""Model code: the Llama decoder, tokenizers, loading from the store."""
