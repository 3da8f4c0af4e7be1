"""What the tests and the benchmarks share: the real model, text corpora, a local hub, tiny checkpoints.

Developer tooling kept at the top of the repository; the wheel does not carry it.
"""
