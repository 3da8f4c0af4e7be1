"""torch's int4 weight packings (the `_weight_int4pack_mm` kernels'), read back and sized: what QuantLinear needs
to keep one copy of the codes."""

from __future__ import annotations

import functools

import torch


def unpack_int4pack_cpu(packed: torch.Tensor, out_features: int, in_features: int, tile: int = 32) -> torch.Tensor:
    """Codes (out, in) back from `_convert_weight_to_int4pack_for_cpu`'s uint8 (out, in/2): tiles of `tile` output
    rows (32 in torch's AVX2 builds, 64 in its AVX-512 ones), stored input-major, the tile's first half of rows in
    the low nibbles and the second in the high ones. The layout is torch's, undocumented: `int4pack_cpu_tile` finds
    which tiles this torch uses before anything relies on it."""
    tiles = packed.view(out_features // tile, in_features // 8, 8, tile // 2)
    nibbles = torch.stack([tiles & 15, tiles >> 4], dim=1)  # (row tile, half, input tile, input, row in half)
    return nibbles.permute(0, 1, 4, 2, 3).reshape(out_features, in_features)


@functools.cache
def int4pack_cpu_tile() -> int | None:
    """The output rows per tile of torch's CPU int4 packing here (32 or 64), None if it is neither layout."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator("cpu").manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    if packed.shape != (128, 32):
        return None
    return next(
        (tile for tile in (32, 64) if torch.equal(unpack_int4pack_cpu(packed, 128, 64, tile).int(), codes)), None
    )


@functools.cache
def int4pack_cpu_layout_known(out_features: int, in_features: int) -> bool:
    """Whether this torch packs a weight of this shape the way `unpack_int4pack_cpu` reads it (random codes)."""
    tile = int4pack_cpu_tile()
    if tile is None or out_features % tile or in_features % 8:
        return False
    codes = torch.randint(
        0,
        16,
        (out_features, in_features),
        dtype=torch.int32,
        device="cpu",
        generator=torch.Generator("cpu").manual_seed(0),
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    return packed.shape == (out_features, in_features // 2) and torch.equal(
        unpack_int4pack_cpu(packed, out_features, in_features, tile).int(), codes
    )


def cuda_inner_k_tiles(in_features: int) -> int:
    """tinygemm's CUDA packing holds the inputs in tiles of inner_k_tiles x 16 (2, 4 or 8): the largest that
    divides them, 0 when none does."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0), 0)
