"""`python -m qwen2cli` is `qwen2`."""

from .cli import main

main()
