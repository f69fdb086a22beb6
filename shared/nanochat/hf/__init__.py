"""Hugging Face remote code for exported folders (`trust_remote_code=True`).

These two modules are copied verbatim into every export folder and loaded from there by
transformers (through config.json's `auto_map`), so they import nothing but torch and
transformers. The vLLM plugin registers the same configuration class.
"""
