"""The nanochat ML core: model, tokenizer, data, training, evaluation (no services code here)."""
