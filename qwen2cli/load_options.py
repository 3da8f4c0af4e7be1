"""LoadOptions: how a model is loaded (device, dtype, context, KV cache, attention, load-time quantization, head),
validated once where it is built. Imports no torch, so a command checks its options before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHES = ("float", "int8")
ATTENTIONS = ("default", "dca")
LOAD_IN = ("8bit", "4bit")
DEFAULT_CTX = 4096  # the context when none is asked for, capped at the model's trained one


@dataclass(frozen=True)
class LoadOptions:
    """What `load_engine` loads a model with. `ctx` None: min(DEFAULT_CTX, the model's trained context); a longer
    one than trained turns YaRN on. `float_head`: a quantized model's head stays float (else int8 rows on CPU)."""

    device: str = "auto"
    dtype: str = "auto"
    ctx: int | None = None
    kv_cache: str = "float"
    attention: str = "default"
    load_in: str | None = None
    float_head: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not _is_cuda_index(self.device):
            raise BadInput(f"unknown --device {self.device!r}: use auto, cpu or cuda (or cuda:N)")
        if self.dtype not in DTYPES:
            raise BadInput(f"unknown --dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.ctx is not None and self.ctx < 2:
            raise BadInput(f"--ctx must be at least 2 tokens, got {self.ctx}")
        if self.kv_cache not in KV_CACHES:
            raise BadInput(f"unknown --kv-cache {self.kv_cache!r}: use float or int8")
        if self.attention not in ATTENTIONS:
            raise BadInput(f"unknown --attention {self.attention!r}: use default or dca")
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise BadInput(f"unknown --load-in {self.load_in!r}: use 8bit or 4bit")

    def context_for(self, trained: int) -> int:
        """The context to size caches for, given the model's trained context (max_position_embeddings)."""
        return self.ctx if self.ctx is not None else min(DEFAULT_CTX, trained)


DEFAULT_LOAD = LoadOptions()  # frozen: one shared default for every signature


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()
