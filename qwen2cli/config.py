"""Qwen2Config: the model's shape and defaults, read from config.json and generation_config.json (HF field names)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import BadCheckpoint, ModelNotFound

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults a checkpoint ships in generation_config.json."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    repetition_penalty: float = 1.05
    max_new_tokens: int = 512


@dataclass(frozen=True)
class Qwen2Config:
    """The fields of a Qwen2 / Qwen2-MoE config.json we use, under their Hugging Face names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    torch_dtype: str | None = None
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization_config: dict[str, Any] | None = None
    dual_chunk_attention_config: dict[str, Any] | None = None
    # Qwen2-MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    def sliding_window_for(self, layer_index: int) -> int | None:
        """The attention window of layer `layer_index`, or None for full attention (transformers' layer_types rule)."""
        if self.use_sliding_window and self.sliding_window and layer_index >= self.max_window_layers:
            return self.sliding_window
        return None

    def linear_input_sizes(self) -> set[int]:
        """The input sizes of the decoder's quantizable Linears (what a quantization group size must divide)."""
        sizes = {self.hidden_size, self.num_attention_heads * self.head_dim}  # q/k/v, gate/up (experts too); o_proj
        for index in range(self.num_hidden_layers):  # down projections
            if self.is_moe_layer(index):
                sizes.update(s for s in (self.moe_intermediate_size, self.shared_expert_intermediate_size) if s)
            else:
                sizes.add(self.intermediate_size)
        return sizes

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether layer `layer_index` uses the sparse MoE block instead of the dense MLP."""
        return (
            self.num_experts > 0
            and layer_index not in self.mlp_only_layers
            and (layer_index + 1) % self.decoder_sparse_step == 0
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadCheckpoint(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BadCheckpoint(f"{path} does not hold a JSON object")
    return data


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict from either the old (rope_theta, rope_scaling) or new (rope_parameters) form."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = raw.get("rope_scaling") or params
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if not scaling or kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise BadCheckpoint(f"unsupported rope scaling type {kind!r} (qwen2cli supports default RoPE and yarn)")
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    scaling["type"] = "yarn"
    scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 32768))
    return theta, scaling


def _generation_defaults(gen: dict[str, Any]) -> GenerationDefaults:
    """generation_config.json's sampling fields. Missing temperature/top-p/top-k take Qwen2.5-Instruct's published
    values; a missing repetition penalty is 1.0, as transformers reads it, so greedy output matches transformers'."""
    base = GenerationDefaults()

    def pick(key: str, fallback: Any, off: Any) -> Any:
        if key not in gen:
            return fallback
        return off if gen[key] is None else gen[key]

    temperature = float(pick("temperature", base.temperature, 1.0))
    if gen.get("do_sample") is False:
        temperature = 0.0
    return GenerationDefaults(
        temperature=temperature,
        top_p=float(pick("top_p", base.top_p, 1.0)),
        top_k=int(pick("top_k", base.top_k, 0)),
        min_p=float(pick("min_p", base.min_p, 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0, 1.0)),
        max_new_tokens=int(pick("max_new_tokens", base.max_new_tokens, base.max_new_tokens)),
    )


def config_from_dict(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> Qwen2Config:
    """Build a Qwen2Config from config.json's dict; refuse other architectures by name."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        shown = model_type or (architectures[0] if architectures else "unknown")
        raise BadCheckpoint(f"unsupported architecture {shown!r}: qwen2cli runs Qwen2, Qwen2.5 and Qwen2-MoE models")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        theta, scaling = _rope(raw)
        eos = _as_tuple((generation or {}).get("eos_token_id")) or _as_tuple(raw.get("eos_token_id"))
        defaults = _generation_defaults(generation or {})
        return Qwen2Config(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw.get("intermediate_size") or 0),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            use_sliding_window=bool(raw.get("use_sliding_window", False)),
            sliding_window=raw.get("sliding_window"),
            max_window_layers=int(raw.get("max_window_layers", 28)),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            model_type=model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            quantization_config=raw.get("quantization_config"),
            dual_chunk_attention_config=raw.get("dual_chunk_attention_config"),
            num_experts=int(raw.get("num_experts") or 0),
            num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step") or 1),
            mlp_only_layers=_as_tuple(raw.get("mlp_only_layers")),
            generation=defaults,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadCheckpoint(f"config.json is missing or has a bad value for {exc}") from exc


def load_config(model_dir: Path) -> Qwen2Config:
    """Read `model_dir`/config.json (+ generation_config.json when present)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFound(f"no such model directory: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BadCheckpoint(f"{model_dir} has no config.json: not a Hugging Face model directory")
    generation_path = model_dir / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else None
    return config_from_dict(_read_json(config_path), generation)


def yarn_for_context(config: Qwen2Config, ctx: int | None) -> dict[str, Any] | None:
    """The YaRN rope scaling an asked-for context needs: only for an explicit `ctx` beyond the trained context of a
    model that has no scaling of its own (factor 2x, 4x ... as Qwen documents, 4 for 128K); else None."""
    trained = config.max_position_embeddings
    if ctx is None or ctx <= trained or config.rope_scaling is not None:
        return None
    factor = float(2 ** math.ceil(math.log2(ctx / trained)))
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": trained}


def with_context(config: Qwen2Config, ctx: int | None, *, attention: str = "default") -> Qwen2Config:
    """The config a model is built from: dual chunk attention added when asked and absent; else YaRN for an
    explicit `ctx` beyond the trained context (yarn_for_context); else the checkpoint's own."""
    if attention == "dca" and config.dual_chunk_attention_config is None:
        chunk_size = config.max_position_embeddings
        dca = {
            "chunk_size": chunk_size,
            "local_size": max(1, chunk_size // 32),
            "original_max_position_embeddings": chunk_size,
        }
        return replace(config, dual_chunk_attention_config=dca)
    scaling = yarn_for_context(config, ctx)
    if scaling is None:
        return config
    extended = int(config.max_position_embeddings * scaling["factor"])
    return replace(config, rope_scaling=scaling, max_position_embeddings=extended)


def context_notice(config: Qwen2Config, ctx: int | None, *, attention: str = "default") -> str | None:
    """The one line that tells a user their asked-for context rescales the model's RoPE, or None."""
    scaled = with_context(config, ctx, attention=attention).rope_scaling
    if scaled is None or scaled is config.rope_scaling:
        return None
    return (
        f"context {ctx} is beyond the model's trained {config.max_position_embeddings}: "
        f"RoPE scaled with YaRN (factor {scaled['factor']:g})"
    )
