"""Model serving: vLLM plugin for the nanochat architecture, native fallback server, supervisor."""
