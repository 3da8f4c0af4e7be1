"""GGUF imports keep the file's block quantization: the stored codes and tables against gguf-py's dequantization
(bit for bit), the native kernels on them against float matmuls, and the imported model against transformers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from qwen2cli.gguf_import import import_gguf
from qwen2cli.gguf_repack import CONVERTERS, repack
from qwen2cli.quant.blocks import BlockFormat, BlockQuantLinear, dequantize_blocks
from qwen2cli.quant.codes import pack_q4, pack_q5, unpack_q5
from qwen2cli.quant.native import build_library, native_flags, native_library
from tests.tiny_gguf import Q4_K_M_LAYER_TYPES, write_tiny_gguf

NATIVE = native_library() is not None
FP16_FIELDS = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(type_name: str, count: int, generator: np.random.Generator) -> np.ndarray:
    """Every bit pattern of codes and sub-block scales, finite fp16 fields."""
    _, size, _, _ = CONVERTERS[type_name]
    blocks = generator.integers(0, 256, size=(count, size), dtype=np.uint8)
    for at in FP16_FIELDS.get(type_name, (0,)):
        blocks[:, at : at + 2] = generator.normal(0, 0.05, size=(count, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("type_name", sorted(CONVERTERS))
def test_repacked_blocks_dequantize_exactly_as_gguf_py(type_name, monkeypatch):
    """Our layout's weights equal `gguf.quants.dequantize` of the same bytes (values compared exactly, across
    several conversion chunks); a ragged input is refused."""
    from gguf import GGMLQuantizationType, quants

    values, _, fmt, _ = CONVERTERS[type_name]
    rows, cols = 10, 3 * max(values, 64)
    blocks = _random_blocks(type_name, rows * cols // values, np.random.default_rng(11))
    expected = quants.dequantize(blocks, GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float32)
    monkeypatch.setattr("qwen2cli.gguf_repack.BLOCKS_PER_CHUNK", 7)
    got = repack(blocks, type_name, rows, cols)
    assert got is not None and got.fmt == fmt
    assert got.codes.shape == (rows, fmt.row_bytes(cols)) and got.scales.shape == (rows, cols // fmt.group_size)
    assert torch.equal(dequantize_blocks(got.codes, got.scales, got.table, got.fmt), torch.from_numpy(expected))
    with pytest.raises(ValueError, match="not 10 rows"):
        repack(blocks.reshape(-1)[:-1], type_name, rows, cols)


def test_q5_packing_round_trips():
    codes = torch.randint(0, 32, (24, 320), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    packed = pack_q5(codes)
    assert packed.shape == (24, 200) and packed.dtype == torch.uint8
    assert torch.equal(unpack_q5(packed).long(), codes)


def _native_builds() -> list:
    from qwen2cli.quant.native import FLAGS

    return [pytest.param(tuple(FLAGS), id="avx2")] + (
        [pytest.param(native_flags(), id="avx512-vnni")] if native_flags() != tuple(FLAGS) else []
    )


FORMATS = [  # what each GGML type becomes, and group sizes beyond them
    *(fmt for _, _, fmt, _ in CONVERTERS.values()),
    BlockFormat("q4", 16, "float32-offsets"),
    BlockFormat("q5", 64, "float16-zeros"),
    BlockFormat("q8", 16, "float16-zeros"),
]


def _random_layer(fmt: BlockFormat, rows: int, cols: int, generator: torch.Generator) -> BlockQuantLinear:
    """Random codes and tables such as GGML's hold: scales an fp16 times a small integer."""
    layer = BlockQuantLinear(cols, rows, bias=True, fmt=fmt)
    top = {"q4": 16, "q5": 32, "q8": 256}[fmt.codes]
    codes = torch.randint(0, top, (rows, cols), generator=generator)
    layer.codes = {"q4": pack_q4, "q5": pack_q5}.get(fmt.codes, lambda c: (c - 128).to(torch.int8))(codes)
    groups = cols // fmt.group_size
    scales = (torch.rand(rows, groups, generator=generator) * 0.01).half()
    if fmt.half:
        layer.scales = scales
        layer.zeros = torch.randint(-128 if fmt.codes == "q8" else 0, top // 2, (rows, groups), generator=generator)
        layer.zeros = layer.zeros.to(torch.int16)
    else:
        layer.scales = scales.float() * torch.randint(1, 64, (rows, groups), generator=generator)
        layer.offsets = -scales.float() * torch.randint(0, 64, (rows, groups), generator=generator)
    layer.bias = torch.randn(rows, generator=generator)
    return layer


@pytest.mark.skipif(not NATIVE, reason="the native kernel cannot build here (test_quant.py says why)")
@pytest.mark.parametrize("flags", _native_builds())
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.source or f.codes}-g{f.group_size}-{f.tables}")
def test_native_kernels_on_block_layouts_within_activation_rounding(flags, fmt, monkeypatch):
    """qgemv.c on each block layout (q5 codes and groups of 16 included): within the bound its int8 activations
    allow (test_quant.py's), for 1 to 9 rows (past the 8 a pass of the interleaved kernel takes); long inputs'
    unpacked rows are the layer's weights exactly."""
    from qwen2cli.quant.native import native_matmul

    library = build_library(flags)
    assert library is not None
    generator = torch.Generator().manual_seed(fmt.group_size)
    layer = _random_layer(fmt, 40, 384, generator)
    weight = layer.dequantized_weight()
    monkeypatch.setattr("qwen2cli.quant.blocks.native_library", lambda: library)
    layer.post_load()
    assert layer.kernel == f"{fmt.codes}-native-cpu"
    assert layer._interleaved == bool(library.q_x8_supported())  # AVX-512 VNNI builds: 8 rows interleaved
    for rows in (1, 3, 5, 9):
        x = torch.randn(rows, 384, generator=generator) * torch.logspace(-2, 1, 384)
        expected = x.double() @ weight.double().t()
        step = x.view(rows, -1, 32).abs().amax(dim=-1).repeat_interleave(32, dim=-1) / 127
        bound = (step.double() / 2) @ weight.abs().double().t() + 1e-4 * expected.abs().max()
        scales, offsets = (layer._fast[name] for name in layer._native_tables())
        tables = (layer._fast[fmt.codes], scales, offsets, fmt.group_size)
        got = native_matmul(library, fmt.codes, x, *tables, interleaved=layer._interleaved)
        assert bool(((got.double() - expected).abs() <= bound).all())
        alone = [native_matmul(library, fmt.codes, row[None], *tables, interleaved=layer._interleaved) for row in x]
        assert torch.equal(torch.cat(alone), got)  # a row's numbers do not depend on the rows beside it
    for dtype in (torch.float32, torch.bfloat16):
        rows_out = layer._native_rows(8, 40, torch.empty(32, 384, dtype=dtype))
        assert torch.equal(rows_out, weight[8:40].to(dtype))


@pytest.fixture(scope="module", params=["every-type", "q4_k_m", "q4_k_m-tied"])
def tiny(request, tmp_path_factory):
    """(GGUF, imported directory) for a tiny GGUF of every type, and two shaped like llama.cpp's Q4_K_M."""
    choices: dict[str, dict[str, Any]] = {
        "every-type": {},
        "q4_k_m": {"layer_types": Q4_K_M_LAYER_TYPES, "head_type": "Q8_0"},
        "q4_k_m-tied": {"layer_types": Q4_K_M_LAYER_TYPES, "head_type": None},
    }
    options = choices[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    path = write_tiny_gguf(directory / "tiny.gguf", **options)
    return path, import_gguf(path, directory / "model")


def test_imported_weights_are_gguf_py_dequantization_bit_for_bit(tiny):
    """Every tensor of the file, dequantized by gguf-py, against what the import stored: block modules through
    their layout, float tensors as they are; quantization_config lists the block modules and their source types."""
    import gguf
    from safetensors.torch import load_file

    from qwen2cli.gguf_import import hf_tensor_name

    path, imported = tiny
    stored = load_file(imported / "model.safetensors")
    modules = json.loads((imported / "config.json").read_text())["quantization_config"]["modules"]
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        expected = torch.from_numpy(
            np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        ).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        name = hf_tensor_name(tensor.name)
        module = name.rpartition(".")[0]
        if tensor.tensor_type.name in CONVERTERS and name.endswith(".weight"):
            fmt = BlockFormat.from_json(modules[module])
            assert fmt.source == tensor.tensor_type.name
            got = dequantize_blocks(
                stored[f"{module}.codes"], stored[f"{module}.scales"], stored[f"{module}.{fmt.table_names[1]}"], fmt
            )
        else:
            assert name.endswith(".bias") or module not in modules
            got = stored[name].float()
        assert torch.equal(got, expected), tensor.name
    from qwen2cli.model_info import describe

    name = describe(imported)["quantization"]  # what `qwen2 info` shows
    assert name.split(" ")[0] == "gguf-blocks"
    assert set(name.split(" ")[1].split("+")) == {data["source"] for data in modules.values()}


def _reference_logits(path, ids):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(ids).logits


def test_imported_model_matches_transformers_through_dequantized_weights(tiny, monkeypatch):
    """With the kernels off, the block modules multiply by their dequantized weights: transformers' logits on the
    same GGUF within float32 rounding, the prompt and one token at a time."""
    from qwen2cli.generate import load_engine
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.load_options import LoadOptions

    path, imported = tiny
    monkeypatch.setattr("qwen2cli.quant.blocks.native_library", lambda: None)
    engine = load_engine(imported, LoadOptions(device="cpu", dtype="float32"))
    model = engine.loaded.model
    ids = torch.randint(0, 400, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = _reference_logits(path, ids)
    with torch.no_grad():
        got = model(ids, KVCache(engine.config, 24), 0)
        cache = KVCache(engine.config, 24)
        steps = torch.cat([model(ids[:, i : i + 1], cache, i) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(got, expected, atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(steps, expected, atol=3e-4, rtol=1e-4)


@pytest.mark.skipif(not NATIVE, reason="the native kernel cannot build here (test_quant.py says why)")
def test_block_tables_read_by_plain_reads_are_those_read_through_mappings(tiny, monkeypatch):
    """The loader hands block layers their stored tensors a block of rows at a time: through a mapping, or, past
    OWN_READ_BYTES (the real model's head), by plain reads. Both give the kernels the same tables, and the layers
    the same outputs."""
    from qwen2cli import quantized_load
    from qwen2cli.generate import load_engine
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.quant.blocks import BlockQuantLinear

    _, imported = tiny

    def tables() -> dict[str, dict[str, torch.Tensor]]:
        model = load_engine(imported, LoadOptions(device="cpu", dtype="float32")).loaded.model
        return {n: m._fast for n, m in model.named_modules() if isinstance(m, BlockQuantLinear) and m._fast}

    mapped = tables()
    monkeypatch.setattr(quantized_load, "OWN_READ_BYTES", 0)
    read = tables()
    assert mapped and mapped.keys() == read.keys()
    for name, fast in mapped.items():
        assert fast.keys() == read[name].keys()
        assert all(torch.equal(fast[key], read[name][key]) for key in fast), name


def test_imported_model_decodes_on_the_kernels_in_c(tiny):
    """Every Linear block-quantized (the Q4_K_M shapes, v/down of two kinds in one layer): the one-token C decoder
    runs, as close to exact float math (every layer dequantize-then-matmul) as the Python path over the same
    kernels is, its first layer's keys and values the Python path's (test_quant.py's comparison)."""
    from qwen2cli.generate import load_engine
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.load_options import LoadOptions
    from tests.decode_paths import DecodePaths

    path, imported = tiny
    engine = load_engine(imported, LoadOptions(device="cpu", dtype="float32"))
    model = engine.loaded.model
    if imported.parent.name.startswith("every-type"):
        assert model.fast_decode is None  # float Linears among its layers: the Python path
        return
    assert model.fast_decode is not None
    paths = DecodePaths(model)
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(1))
    first_layer = {}

    def run(mode: str) -> torch.Tensor:
        paths.use(mode)
        cache = KVCache(engine.config, 32)
        with torch.no_grad():
            logits = [model(ids[:, :8], cache, 0)[0]]
            logits += [model(ids[:, i : i + 1], cache, i)[0] for i in range(8, 24)]
        first_layer[mode] = (cache.keys[0][:, :, :24].clone(), cache.values[0][:, :, :24].clone())
        return torch.cat(logits)

    exact, python, native = run("exact"), run("python"), run("native")
    for ours, theirs in zip(first_layer["native"], first_layer["python"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())

    def error(logits: torch.Tensor) -> float:
        return ((logits - exact).norm() / exact.norm()).item()

    assert error(native) < 1.5 * error(python) + 1e-3, (error(native), error(python))
    assert ((native - python).norm() / python.norm()).item() < 0.05


REAL_PROMPTS = [
    "Write a Python function that reverses a string.",
    "用一句话介绍长城。",
    "Explain what a hash table is in two sentences.",
    "def quicksort(xs):",
]


@pytest.fixture(scope="module")
def real_import(tmp_path_factory):
    """(GGUF, its import) of the real model, and transformers' float32 model read from the same GGUF."""
    from transformers import AutoModelForCausalLM

    from devtools.real_model import real_gguf, real_hf_dir

    try:
        path, float_dir = real_gguf(), real_hf_dir()
    except RuntimeError as exc:
        pytest.fail(str(exc))  # the real group never skips
    imported = import_gguf(path, tmp_path_factory.mktemp("real") / "model")
    return path, imported, AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()


@pytest.mark.real
def test_real_import_is_gguf_py_bit_for_bit_and_small(real_import):
    """The real Q4_K_M file: every block tensor's weights equal gguf-py's dequantization; the checkpoint is at most
    1.2x the GGUF's size."""
    import gguf
    from safetensors import safe_open

    from qwen2cli.gguf_import import hf_tensor_name

    path, imported, _ = real_import
    size = sum(item.stat().st_size for item in imported.iterdir())
    assert size <= 1.2 * path.stat().st_size, (size, path.stat().st_size)
    modules = json.loads((imported / "config.json").read_text())["quantization_config"]["modules"]
    reader = gguf.GGUFReader(str(path))
    with safe_open(str(imported / "model.safetensors"), framework="pt") as stored:
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            module = name.rpartition(".")[0]
            if module not in modules or not name.endswith(".weight"):
                continue
            fmt = BlockFormat.from_json(modules[module])
            codes, scales, table = (stored.get_tensor(f"{module}.{key}") for key in ("codes", *fmt.table_names))
            got = dequantize_blocks(codes, scales, table, fmt)
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(got.shape))
            assert torch.equal(got, torch.from_numpy(np.asarray(expected, dtype=np.float32))), tensor.name


@pytest.mark.real
def test_real_import_greedy_within_activation_rounding_of_transformers(real_import, monkeypatch):
    """Through the dequantized weights the last prompt position's logits are transformers' (float32 copy of the same
    GGUF) within 1e-3. On the kernels, greedy continuations pick transformers' best token, or one within the noise
    of int8 activations (test_quant_real.py's allowance: under 1.5 below its best, at least 80% exactly it)."""
    from qwen2cli.generate import Stats, generate, load_engine
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.runner import prompt_ids
    from qwen2cli.sampling import SamplingParams

    _, imported, reference = real_import
    engine = load_engine(imported, LoadOptions(device="cpu", dtype="float32"))
    assert engine.loaded.model.fast_decode is not None
    gaps = []
    for prompt in REAL_PROMPTS:
        ids = prompt_ids(engine, prompt, raw=False, system=None)
        params = SamplingParams(temperature=0, max_tokens=20, repeat_penalty=1.0)
        stats = Stats()
        for _ in generate(engine, ids, params=params, cache=engine.new_cache(len(ids) + 21), stats=stats):
            pass
        tokens = [token for token in stats.generated_ids if token not in engine.stop_ids]
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
        gaps += [(row.max() - row[token]).item() for row, token in zip(logits, tokens, strict=True)]
    assert max(gaps) < 1.5, sorted(gaps)[-5:]
    assert sum(gap == 0 for gap in gaps) >= 0.8 * len(gaps), gaps

    monkeypatch.setattr("qwen2cli.quant.blocks.native_library", lambda: None)
    exact = load_engine(imported, LoadOptions(device="cpu", dtype="float32")).loaded
    forced = torch.tensor([prompt_ids(engine, REAL_PROMPTS[3], raw=False, system=None)])
    with torch.inference_mode():
        expected = reference(forced).logits[0, -1]
        got = exact.model(forced, KVCache(exact.config, forced.shape[1] + 1), 0, last_only=True)[0, -1]
    assert (got - expected).abs().max().item() < 1e-3


def test_float_export_loads_in_transformers_as_the_gguf(tiny, tmp_path):
    """write_float_checkpoint: a plain float32 checkpoint transformers loads, with the GGUF's weights exactly (its own
    GGUF reader's); an existing target or a checkpoint that is not an import is refused."""
    from transformers import AutoModelForCausalLM

    from qwen2cli.errors import BadInput
    from qwen2cli.gguf_import import write_float_checkpoint

    path, imported = tiny
    out = write_float_checkpoint(imported, tmp_path / "float")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    expected = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(BadInput, match="exists"):
        write_float_checkpoint(imported, out)
    with pytest.raises(BadInput, match="not a GGUF import"):
        write_float_checkpoint(out, tmp_path / "again")


def test_export_command_writes_the_float_copy(tiny, tmp_path):
    """`qwen2 export MODEL --float DIR`: the float checkpoint's path on stdout; an existing DIR, a missing --float
    and a model that is no GGUF import are one-line errors."""
    import subprocess
    import sys

    _, imported = tiny

    def export(*args: str) -> subprocess.CompletedProcess:
        env = {"QWEN2_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
        command = [sys.executable, "-m", "qwen2cli", "export", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    done = export(str(imported), "--float", str(tmp_path / "float"))
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "float"), done.stderr
    assert json.loads((tmp_path / "float" / "config.json").read_text())["torch_dtype"] == "float32"
    for args, fragment in (
        ((str(imported), "--float", str(tmp_path / "float")), "exists"),
        ((str(imported),), "--float DIR"),
        ((str(tmp_path / "float"), "--float", str(tmp_path / "again")), "not a GGUF import"),
    ):
        failed = export(*args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and fragment in failed.stderr, failed.stderr


@pytest.mark.real
def test_real_import_served_side_by_side_answers_as_alone(real_import):
    """The default model's form on the native kernels: four requests answered at once by `qwen2 serve` (fresh
    slots, so each prompt is read whole) each get exactly the tokens that greedy generation gives that prompt alone
    in a fresh cache: the C layers' rows never depend on each other."""
    import threading

    import httpx
    import openai

    from qwen2cli.generate import generate, load_engine
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.sampling import SamplingParams
    from tests.serve_helpers import our_ids, start_server

    _, imported, _ = real_import
    questions = ["Write a haiku about autumn.", "def add(a, b):", "What is 12 * 7?", "Name three colours."]
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in questions]
    answers: list[str | None] = [None] * len(questions)
    process, url = start_server(imported, "--parallel", str(len(questions)))
    try:
        client: Any = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        together = threading.Barrier(len(questions))

        def ask(index: int) -> None:
            together.wait()
            answer = client.chat.completions.create(
                model=model,
                messages=conversations[index],
                temperature=0,
                max_tokens=24,
                extra_body={"repetition_penalty": 1.0},
            )
            answers[index] = answer.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(questions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        widest = httpx.get(f"{url}/health").json()["requests"]["widest_step"]
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert widest > 1  # they were decoded side by side
    engine = load_engine(imported, LoadOptions(device="cpu"))
    params = SamplingParams(temperature=0, max_tokens=24, repeat_penalty=1.0)
    for messages, answer in zip(conversations, answers, strict=True):
        ids = our_ids(imported, messages, None)
        alone = "".join(chunk.text for chunk in generate(engine, ids, params=params, cache=engine.new_cache(64)))
        assert alone == answer, messages
