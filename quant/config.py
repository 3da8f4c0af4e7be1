"""QuantConfig <-> the `quantization_config` JSON that transformers, vLLM, GPTQModel and AutoAWQ read and write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized checkpoint is. RTN output is written in the GPTQ format (method 'gptq' on disk)."""

    method: str = "gptq"  # gptq | awq | rtn
    bits: int = 4
    group_size: int = 128  # -1: one group spanning all input channels
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    checkpoint_format: str = "gptq"  # gptq (v1: zeros stored minus one) | gptq_v2
    damp_percent: float = 0.01
    mse: float = 0.0  # GPTQ: > 0 searches each group's clipping range by least |w - q(w)|^mse
    hessian_shrink: float | None = None  # GPTQ: pull H toward its diagonal by this much; None: in / (in + tokens)

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "awq", "rtn"):
            raise ValueError(f"unknown quantization method {self.method!r}: use gptq, awq or rtn")
        if self.bits not in (4, 8):
            raise ValueError(f"{self.bits}-bit is not supported: use 4 or 8")
        if self.method == "awq" and self.bits != 4:
            raise ValueError("AWQ checkpoints are 4-bit only (the AWQ GEMM layout packs eight 4-bit values)")
        if self.group_size != -1 and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group size {self.group_size} is not supported: use 32, 64, 128, 256 or -1")
        if self.hessian_shrink is not None and not 0 <= self.hessian_shrink <= 1:
            raise ValueError(f"Hessian shrinkage must be in [0, 1] or auto, got {self.hessian_shrink}")
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"unknown checkpoint_format {self.checkpoint_format!r}")

    @property
    def layout(self) -> str:
        """The on-disk tensor layout: 'gptq' or 'awq'."""
        return "awq" if self.method == "awq" else "gptq"

    def group_size_for(self, in_features: int) -> int:
        """The group length for a layer; refuses a group size that does not divide its input size."""
        size = in_features if self.group_size == -1 else self.group_size
        if in_features % size:
            raise ValueError(f"group size {size} does not divide the input size {in_features}")
        return size

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> QuantConfig:
        method = str(data.get("quant_method", "gptq")).lower()
        if method == "awq":
            if str(data.get("version", "gemm")).lower() != "gemm":
                raise ValueError(f"AWQ version {data.get('version')!r} is not supported (only gemm)")
            return cls(
                method="awq",
                bits=int(data.get("bits", data.get("w_bit", 4))),
                group_size=int(data.get("group_size", data.get("q_group_size", 128))),
                sym=not bool(data.get("zero_point", True)),
            )
        if method != "gptq":
            raise ValueError(f"quant_method {method!r} is not supported (gptq or awq)")
        return cls(
            method="gptq",
            bits=int(data.get("bits", 4)),
            group_size=int(data.get("group_size", 128)),
            sym=bool(data.get("sym", True)),
            desc_act=bool(data.get("desc_act", False)),
            static_groups=bool(data.get("static_groups", False)),
            checkpoint_format=str(data.get("checkpoint_format", "gptq")),
            damp_percent=float(data.get("damp_percent", 0.01)),
            mse=float(data.get("mse", 0.0) or 0.0),
            hessian_shrink=_shrink_from_hf(data.get("hessian_shrink", 0.0)),
        )

    def to_hf(self) -> dict[str, Any]:
        if self.method == "awq":
            return {
                "quant_method": "awq",
                "bits": self.bits,
                "group_size": self.group_size,
                "zero_point": not self.sym,
                "version": "gemm",
            }
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "damp_percent": self.damp_percent,
            "mse": self.mse,
            "hessian_shrink": "auto" if self.hessian_shrink is None else self.hessian_shrink,
            "true_sequential": True,
            "checkpoint_format": self.checkpoint_format,
            "quantizer": "qwen2cli-rtn" if self.method == "rtn" else "qwen2cli-gptq",
        }


def _shrink_from_hf(value: Any) -> float | None:
    """quantize_config's "hessian_shrink" (ours; other tools write none, which is no shrinkage): "auto" or 0-1."""
    return None if value == "auto" else float(value or 0.0)
