"""Dual Chunk Attention: ordinary attention within one chunk; the paper's equations, pair by pair, across chunks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from devtools.tiny_checkpoint import write_tiny_checkpoint
from qwen2cli.checkpoint import load_model
from qwen2cli.dca import DualChunkConfig, dual_chunk_attention, rotate
from qwen2cli.kv_cache import KVCache
from qwen2cli.load_options import LoadOptions


def rope_angle_tables(dim: int, max_pos: int, theta: float = 10000.0):
    inverse = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(max_pos).float(), inverse)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def reference_dca(q, k, v, *, chunk_size, local_size, cos, sin):
    """Slow, pair-by-pair DCA from the definition: q, k, v (T, D) unrotated; causal; one softmax per query."""
    chunk_len = chunk_size - local_size
    length, dim = q.shape

    def rot(x, p):
        half = dim // 2
        return x * cos[p] + torch.cat((-x[half:], x[:half])) * sin[p]

    out = torch.zeros_like(v)
    for i in range(length):
        scores = []
        for j in range(i + 1):
            if j // chunk_len == i // chunk_len:
                query_pos = i % chunk_len  # intra-chunk: true in-chunk positions
            elif j // chunk_len == i // chunk_len - 1:
                query_pos = min(i % chunk_len + chunk_len, chunk_size)  # successive chunk
            else:
                query_pos = min(2 * chunk_len - 1, chunk_size)  # inter-chunk: a constant, farthest position
            scores.append(torch.dot(rot(q[i], query_pos), rot(k[j], j % chunk_len)) / math.sqrt(dim))
        weights = torch.stack(scores).softmax(0)
        out[i] = weights @ v[: i + 1]
    return out


@pytest.mark.parametrize("chunk_size,local_size,length,start", [(12, 3, 40, 0), (16, 4, 37, 0), (10, 2, 30, 17)])
def test_matches_reference_across_chunks(chunk_size, local_size, length, start):
    torch.manual_seed(0)
    dim, group = 8, 2
    config = DualChunkConfig(chunk_size=chunk_size, local_size=local_size)
    cos, sin = rope_angle_tables(dim, chunk_size + 1)
    q = torch.randn(group, length, dim, dtype=torch.float64).float()
    k, v = torch.randn(length, dim), torch.randn(length, dim)
    positions = torch.arange(length)
    key_pos, succ_pos = config.key_positions(positions), config.successive_positions(positions)
    inter_pos = torch.full_like(positions, config.inter_position())
    keys = rotate(k[None, None], cos[key_pos], sin[key_pos])  # (1, 1, T, D)
    grouped = q[None, None]  # (1, 1, group, T, D)
    intra, successive, inter = [
        rotate(grouped[..., start:, :], c[p[start:]], s[p[start:]])
        for c, s, p in ((cos, sin, key_pos), (cos, sin, succ_pos), (cos, sin, inter_pos))
    ]
    got = dual_chunk_attention((intra, successive, inter), keys, v[None, None], start_pos=start, config=config)[0, 0]
    for head in range(group):
        expected = reference_dca(q[head], k, v, chunk_size=chunk_size, local_size=local_size, cos=cos, sin=sin)
        torch.testing.assert_close(got[head], expected[start:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "chunk_size,local_size,length,start,dtype", [(80, 16, 200, 0, torch.float32), (96, 32, 150, 70, torch.bfloat16)]
)
def test_c_kernel_matches_across_chunks(chunk_size, local_size, length, start, dtype):
    """quant/attention.c's dual chunk attention (AVX-512 builds; chunks of a multiple of 64 keys) against
    dual_chunk_attention above and, for the first head, the pair-by-pair reference: several chunks, a chunk of
    queries starting inside one, a bfloat16 cache."""
    from qwen2cli.quant.native import native_library, prefill_attention

    library = native_library()
    if library is None or not library.attention_supported():
        pytest.skip("no AVX-512 build of the native kernels here: dual_chunk_attention runs instead")
    torch.manual_seed(1)
    dim, group = 16, 2
    config = DualChunkConfig(chunk_size=chunk_size, local_size=local_size)
    cos, sin = rope_angle_tables(dim, chunk_size + 1)
    q = torch.randn(group, length, dim)
    k, v = torch.randn(length, dim), torch.randn(length, dim)
    positions = torch.arange(length)
    key_pos, succ_pos = config.key_positions(positions), config.successive_positions(positions)
    inter_pos = torch.full_like(positions, config.inter_position())
    keys = rotate(k[None, None], cos[key_pos], sin[key_pos]).to(dtype)  # (1, 1, T, D), as the cache holds them
    values = v[None, None].to(dtype)
    intra, successive, inter = [
        rotate(q[None, None, :, start:], c[p[start:]], s[p[start:]])
        for c, s, p in ((cos, sin, key_pos), (cos, sin, succ_pos), (cos, sin, inter_pos))
    ]
    got = prefill_attention(
        intra[0, 0], keys[0], values[0], start, dual_chunk=(successive[0, 0], inter[0, 0], config.chunk_len)
    )
    assert got is not None
    expected = dual_chunk_attention((intra, successive, inter), keys, values, start_pos=start, config=config)[0, 0]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    if dtype == torch.float32:
        reference = reference_dca(q[0], k, v, chunk_size=chunk_size, local_size=local_size, cos=cos, sin=sin)
        torch.testing.assert_close(got[0], reference[start:], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    plain = write_tiny_checkpoint(tmp_path_factory.mktemp("plain"), with_tokenizer=False)
    dual = tmp_path_factory.mktemp("dual")
    for item in plain.iterdir():
        (dual / item.name).write_bytes(item.read_bytes())
    config = json.loads((dual / "config.json").read_text())
    # chunks of 64 keys: on AVX-512 builds the model's prompts and decoding run quant/attention.c's kernel
    config["dual_chunk_attention_config"] = {"chunk_size": 72, "local_size": 8, "original_max_position_embeddings": 72}
    (dual / "config.json").write_text(json.dumps(config))
    return load_model(plain, LoadOptions(device="cpu", dtype="float32")), load_model(
        dual, LoadOptions(device="cpu", dtype="float32")
    )


def test_equals_ordinary_attention_within_one_chunk(tiny_pair):
    plain, dual = tiny_pair
    ids = torch.randint(0, 500, (1, 50), generator=torch.Generator().manual_seed(4))  # 50 < chunk_len 64
    with torch.no_grad():
        expected = plain.model(ids, KVCache(plain.config, 64), 0)
        got = dual.model(ids, KVCache(dual.config, 64), 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_cached_decoding_equals_full_forward_across_chunks(tiny_pair):
    _, dual = tiny_pair
    ids = torch.randint(0, 500, (1, 150), generator=torch.Generator().manual_seed(5))  # into a third chunk
    with torch.no_grad():
        full = dual.model(ids, KVCache(dual.config, 160), 0)
        cache = KVCache(dual.config, 160)
        pieces = [dual.model(ids[:, :70], cache, 0)] + [dual.model(ids[:, i : i + 1], cache, i) for i in range(70, 150)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
