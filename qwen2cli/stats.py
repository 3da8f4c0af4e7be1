"""Token counts and timings of one answer, from a local generation or a server's stream; no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens that actually ran through the model (the rest were cached)
    completion_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    generated_ids: list[int] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else 0.0
