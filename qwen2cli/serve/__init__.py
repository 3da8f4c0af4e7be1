"""`qwen2 serve`: an OpenAI-compatible HTTP server over one warm model."""
