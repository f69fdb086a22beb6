"""Native OpenAI-compatible server on our own PyTorch model (fallback when vLLM is unavailable)."""
