"""QuantizeSettings: what `qwen2 quantize` does, built once by the command and checked there, before torch or the
weights load; the pipeline reads it as given. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Qwen2Config
from ..errors import BadInput
from ..quant.config import QuantConfig
from .calibration import read_calibration

METHODS = ("gptq", "awq", "rtn")


@dataclass(frozen=True)
class QuantizeSettings:
    """The method and its options, the calibration set, and the QuantConfig they make (`quant_config`). None for
    group_size, desc_act and static_groups is the method's default: groups of 128 at 4 bits and per channel at 8;
    for GPTQ act-order with static groups, the best measured at group 128 (docs/quantization.md), whose groups stay
    contiguous so the checkpoint runs as fast as one without act-order. `shrink` None: GPTQ's automatic Hessian
    shrinkage. `calib`: a text or JSONL file (read here), else the built-in calibration text."""

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    desc_act: bool | None = None
    static_groups: bool | None = None
    damp: float = 0.01
    shrink: float | None = None
    clip: bool = False
    samples: int = 128
    seq_len: int = 512
    calib: Path | None = None
    quant_config: QuantConfig = field(init=False, repr=False, compare=False)
    calibration: str | None = field(init=False, repr=False, compare=False)  # the text of `calib`

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"unknown --method {self.method!r}: use gptq, awq or rtn")
        if not 0 < self.damp <= 1:
            raise BadInput(f"--damp must be in (0, 1], got {self.damp}")
        if self.clip and self.method != "awq":
            raise BadInput("--clip is an AWQ option (GPTQ and RTN take each group's range from its weights)")
        if self.samples < 1:
            raise BadInput(f"--samples must be at least 1, got {self.samples}")
        if self.seq_len < 1:
            raise BadInput(f"--seq-len must be at least 1, got {self.seq_len}")
        desc_act = self.method == "gptq" if self.desc_act is None else self.desc_act
        static_groups = self.method == "gptq" and desc_act if self.static_groups is None else self.static_groups
        group_size = (128 if self.bits == 4 else -1) if self.group_size is None else self.group_size
        try:
            quant_config = QuantConfig(
                method=self.method,
                bits=self.bits,
                group_size=group_size,
                sym=self.sym,
                desc_act=desc_act,
                static_groups=static_groups,
                damp_percent=self.damp,
                hessian_shrink=self.shrink,
            )
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        if self.method == "awq" and (desc_act or static_groups or group_size == -1):
            raise BadInput("AWQ has no act-order or static groups and needs a group size (32, 64, 128 or 256)")
        object.__setattr__(self, "quant_config", quant_config)
        object.__setattr__(self, "calibration", read_calibration(self.calib) if self.calib is not None else None)

    @property
    def label(self) -> str:
        """What the output is, as the store names it: gptq-int4, awq-int4, rtn-int8 ..."""
        return f"{self.method}-int{self.bits}"

    def check_model(self, config: Qwen2Config) -> None:
        """Refuse a model these settings cannot quantize, from its config.json alone: one quantized already, or
        Linears whose input sizes the group size does not divide."""
        if config.quantization_config is not None:
            raise BadInput("this model is already quantized; quantize the original checkpoint instead")
        try:
            for size in sorted(config.linear_input_sizes()):
                self.quant_config.group_size_for(size)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
