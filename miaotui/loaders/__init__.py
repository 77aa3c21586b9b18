"""Turn checkpoints on disk (GGUF files, Hugging Face directories) into models and tokenizers."""
