"""Our decoder against transformers' Qwen2ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from devtools.tiny_checkpoint import write_tiny_checkpoint
from qwen2cli.checkpoint import load_model
from qwen2cli.kv_cache import KVCache
from qwen2cli.load_options import LoadOptions

VARIANTS: dict[str, dict[str, Any]] = {  # write_tiny_checkpoint keyword arguments
    "untied-2kv": {},
    "tied-2kv": {"tie": True},
    "1kv": {"num_kv_heads": 1},
    "4kv": {"num_kv_heads": 4},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "sliding": {"sliding_window": 8, "max_window_layers": 1},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = write_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param), with_tokenizer=False, **VARIANTS[request.param]
    )
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(directory, LoadOptions(device="cpu", dtype="float32"))
    return reference, ours


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (1, length), generator=generator)


def test_full_forward_matches(pair):
    reference, ours = pair
    ids = _ids(40)
    with torch.no_grad():
        expected = reference(ids).logits
        cache = KVCache(ours.config, 64)
        got = ours.model(ids, cache, 0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cached_decoding_matches_full_forward(pair):
    reference, ours = pair
    ids = _ids(40, seed=2)
    with torch.no_grad():
        expected = reference(ids).logits
        cache = KVCache(ours.config, 64)
        prefix = ours.model(ids[:, :7], cache, 0)  # a chunked start, then one token at a time
        steps = [ours.model(ids[:, i : i + 1], cache, i) for i in range(7, ids.shape[1])]
    got = torch.cat([prefix, *steps], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_64_tokens_identical(pair):
    reference, ours = pair
    ids = _ids(8, seed=3)
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, 8:
        ].tolist()
        cache = KVCache(ours.config, 128)
        logits = ours.model(ids, cache, 0, last_only=True)
        got = []
        for _ in range(64):
            token = int(logits[0, -1].argmax())
            got.append(token)
            logits = ours.model(torch.tensor([[token]]), cache, cache.pos)
    assert got == expected


def test_auto_dtype_rule():
    from dataclasses import replace

    from qwen2cli.checkpoint import resolve_dtype
    from qwen2cli.config import config_from_dict

    base = config_from_dict(
        {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    )
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", replace(base, torch_dtype="float32"), cpu) == torch.float32
    assert resolve_dtype("auto", replace(base, torch_dtype="bfloat16"), cpu) == torch.bfloat16
    assert resolve_dtype("auto", replace(base, torch_dtype="float16"), cpu) == torch.bfloat16
    assert resolve_dtype("float16", base, cpu) == torch.float16


def test_embedding_table_kept_as_stored_changes_no_logit(tmp_path):
    """On CPU an untied embedding table stays in its stored dtype (a view of the file, only looked-up rows read) and
    rows are cast as they are looked up: the logits equal those of the table cast whole at load, bit for bit."""
    directory = write_tiny_checkpoint(tmp_path / "tiny", with_tokenizer=False)
    ours = load_model(directory, LoadOptions(device="cpu", dtype="bfloat16"))
    table = ours.model.model.embed_tokens.weight
    assert table.dtype == torch.float32 and ours.model.lm_head.weight.dtype == torch.bfloat16
    ids = _ids(12)
    with torch.inference_mode():
        kept = ours.model(ids, KVCache(ours.config, 16, dtype=torch.bfloat16), 0)
        ours.model.model.embed_tokens.weight = torch.nn.Parameter(table.to(torch.bfloat16), requires_grad=False)
        cast_at_load = ours.model(ids, KVCache(ours.config, 16, dtype=torch.bfloat16), 0)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, cast_at_load)


def test_read_state_dict_gives_the_stored_values(tiny_model):
    """Tensors kept as views, converted ones and transient ones (each read through a mapping of its own) hold what
    safetensors' own loader reads."""
    from safetensors.torch import load_file

    from qwen2cli.weights import read_state_dict

    path = tiny_model / "model.safetensors"
    reference = load_file(str(path))
    converted = {name for name in reference if "mlp" in name}
    transient = frozenset(name for name in reference if "self_attn" in name)
    state = read_state_dict(
        [path], lambda name, t: (torch.bfloat16 if name in converted else t.dtype, t.device), transient
    )
    assert state.keys() == reference.keys() and converted and transient
    for name, tensor in state.items():
        expected = reference[name].to(torch.bfloat16) if name in converted else reference[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


def test_stored_rows_read_blocks_of_rows_as_stored(tmp_path):
    """StoredRows' plain reads give any block of rows of any stored dtype as safetensors reads them; a file cut
    short is a BadCheckpoint naming it."""
    from safetensors.torch import load_file, save_file

    from qwen2cli.errors import BadCheckpoint
    from qwen2cli.weights import StoredRows

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "codes": torch.randint(-128, 128, (37, 24), generator=generator, dtype=torch.int8),
        "scales": torch.randn(37, 3, generator=generator).to(torch.float16),
        "weight": torch.randn(37, 5, 2, generator=generator).to(torch.bfloat16),
        "zeros": torch.randint(-300, 300, (37, 3), generator=generator, dtype=torch.int16),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference, stored = load_file(str(path)), StoredRows(path)
    for name, tensor in reference.items():
        read = stored.reader(name)
        for start, stop in ((0, 37), (0, 8), (8, 16), (32, 37), (5, 5)):
            rows = read(start, stop)
            assert rows.dtype == tensor.dtype and torch.equal(rows, tensor[start:stop]), (name, start, stop)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(BadCheckpoint, match="cut.safetensors"):  # the last tensor's rows run past the end
        for name in reference:
            StoredRows(cut).reader(name)(0, 37)
