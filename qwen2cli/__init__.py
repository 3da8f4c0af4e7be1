"""qwen2cli: run the Qwen2 family of language models on your own machine."""

__version__ = "0.1.0"
