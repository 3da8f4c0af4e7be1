"""Nothing of the user's is destroyed or lost: quantize's --out, KV caches larger than memory, the store's leftovers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2cli.config import load_config
from qwen2cli.errors import BadInput
from qwen2cli.kv_cache import Int8KVCache, KVCache
from qwen2cli.memory import available_memory, check_cache_fits

QUANTIZE = ("quantize", "--method", "rtn", "--group-size", "32")


def qwen2(
    *args: str, cwd: Path | None = None, home: Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "QWEN2_HOME": str(home), "NO_COLOR": "1", **(env or {})}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its contents."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert fragment in lines[0], lines[0]
    assert done.stdout == ""


@pytest.fixture()
def sandbox(tmp_path) -> Path:
    """A directory of the user's: a file, and a subdirectory with a file of its own."""
    root = tmp_path / "sandbox"
    (root / "inner").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "inner" / "data.csv").write_text("1,2,3")
    return root


def test_quantize_refuses_a_directory_holding_other_files(tiny_model, sandbox, tmp_path):
    before = tree(sandbox)
    refused(qwen2(*QUANTIZE, str(tiny_model), "--out", str(sandbox), home=tmp_path / "home"), "not empty")
    # --force replaces only a model directory: this one holds a subdirectory and no config.json
    done = qwen2(*QUANTIZE, str(tiny_model), "--out", str(sandbox), "--force", home=tmp_path / "home")
    refused(done, "not replaced even with --force")
    assert tree(sandbox) == before


def test_quantize_out_through_dotdot_deletes_nothing(tiny_model, sandbox, tmp_path):
    before = tree(sandbox)
    for extra in ((), ("--force",)):
        done = qwen2(*QUANTIZE, str(tiny_model), "--out", str(sandbox / "inner" / ".."), *extra, home=tmp_path / "h")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert tree(sandbox) == before
    assert sorted(p.name for p in sandbox.parent.iterdir()) == ["sandbox"]  # no partial directory left beside it


def test_quantize_out_current_directory_is_refused(tiny_model, sandbox, tmp_path):
    before = tree(sandbox)
    refused(qwen2(*QUANTIZE, str(tiny_model), "--out", ".", cwd=sandbox, home=tmp_path / "home"), "current directory")
    assert tree(sandbox) == before


def test_quantize_out_the_model_itself_is_refused(tiny_model, tmp_path):
    before = tree(tiny_model)
    done = qwen2(*QUANTIZE, str(tiny_model), "--out", str(tiny_model), "--force", home=tmp_path / "home")
    refused(done, "is the model being read")
    assert tree(tiny_model) == before


def test_quantize_writes_a_new_directory_and_replaces_a_model_only_with_force(tiny_model, tmp_path):
    out = tmp_path / "out" / "q4"
    first = qwen2(*QUANTIZE, str(tiny_model), "--out", str(out), home=tmp_path / "home")
    assert first.returncode == 0, first.stderr
    assert Path(first.stdout.strip()) == out.resolve()
    written = tree(out)
    assert json.loads(written["config.json"])["quantization_config"]["bits"] == 4
    refused(qwen2(*QUANTIZE, str(tiny_model), "--out", str(out), home=tmp_path / "home"), "--force")
    assert tree(out) == written
    (out / "stale-extra.bin").write_bytes(b"old")  # a plain file in a model directory: replaced with the model
    again = qwen2(*QUANTIZE, str(tiny_model), "--bits", "8", "--out", str(out), "--force", home=tmp_path / "home")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert not (out / "stale-extra.bin").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["q4"]  # neither the new one's staging nor the old one


def test_quantize_into_an_empty_directory(tiny_model, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    done = qwen2(*QUANTIZE, str(tiny_model), "--out", str(out), home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


# -- KV cache against memory ---------------------------------------------------------------------------------


def test_chat_with_a_context_larger_than_memory_is_refused_with_one_that_fits(tiny_model, tmp_path):
    requested = 10**11
    done = qwen2("chat", str(tiny_model), "--ctx", str(requested), stdin="hi\n", home=tmp_path / "home")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    error = done.stderr.strip().splitlines()[-1]  # after the note that the context turns YaRN on
    assert error.startswith("error: ") and "allocate" not in error, error
    said = re.search(r"--ctx (\d+) is the longest that fits", error)
    assert said is not None, error
    longest = int(said.group(1))
    per_token = KVCache(load_config(tiny_model), 1).nbytes  # the cache's own size for one position
    free = available_memory("cpu")
    assert free is not None and 2 <= longest < requested
    assert longest * per_token <= free
    with_int8 = re.search(r"\((\d+) with --kv-cache int8\)", error)
    assert with_int8 is not None, error
    assert int(with_int8.group(1)) * Int8KVCache(load_config(tiny_model), 1).nbytes <= free
    assert int(with_int8.group(1)) > longest


def test_check_cache_fits_agrees_with_the_caches_own_size(tiny_model):
    config = load_config(tiny_model)
    for cache, element_bytes in ((KVCache(config, 100, dtype=torch.bfloat16), 2), (Int8KVCache(config, 100), 1)):
        needed = cache.nbytes  # what 100 positions really take
        check_cache_fits(config, 100, element_bytes=element_bytes, available=int(needed / 0.9) + 1)
        with pytest.raises(BadInput, match=r"--ctx 9\d is the longest that fits"):
            check_cache_fits(config, 100, element_bytes=element_bytes, available=int(needed * 0.95 / 0.9))
    with pytest.raises(BadInput, match="no context fits"):
        check_cache_fits(config, 100, element_bytes=4, available=10)


def test_available_memory_is_below_the_machines_total():
    free = available_memory("cpu")
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- the store's leftovers -----------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_of_a_dead_process_is_removed_by_the_next_store_command(tiny_model, tmp_path):
    models = tmp_path / "home" / "models"
    dead, alive = dead_pid(), os.getpid()
    shutil.copytree(tiny_model, models / "replaced-model-7")
    leftovers = [models / f".staging-Qwen--big-{dead}-123456", models / f".old-replaced-model-7-{dead}"]
    working = [models / f".staging-other-{alive}-987", models / f".old-replacing-{alive}"]
    for directory in (*leftovers, *working):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"\0" * 4096)
    done = qwen2("list", home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in leftovers)
    assert all((path / "model.safetensors").is_file() for path in working)  # a live process's work is left alone
    assert (models / "replaced-model-7" / "config.json").is_file()


def test_an_entry_moved_aside_by_a_killed_install_is_put_back(tiny_model, tmp_path):
    models = tmp_path / "home" / "models"
    shutil.copytree(tiny_model, models / f".old-tiny-{dead_pid()}")  # killed before its replacement arrived
    done = qwen2("list", "--json", home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert [row["name"] for row in json.loads(done.stdout)] == ["tiny"]
    assert tree(models / "tiny") == tree(tiny_model)


def test_quantize_puts_back_a_model_a_killed_quantize_had_moved_aside(tiny_model, tmp_path):
    out = tmp_path / "q4"
    dead = dead_pid()
    shutil.copytree(tiny_model, tmp_path / f".q4.old-{dead}")  # the user's model, moved aside, never replaced
    (tmp_path / f".q4.partial-{dead}").mkdir()  # the killed run's unfinished output
    (tmp_path / f".q4.partial-{dead}" / "model.safetensors").write_bytes(b"half")
    refused(qwen2(*QUANTIZE, str(tiny_model), "--out", str(out), home=tmp_path / "home"), "not empty")
    assert tree(out) == tree(tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q4")) == []


def test_list_shows_sizes_on_disk(tiny_model, tmp_path):
    home = tmp_path / "home"
    entry = home / "models" / "tiny"
    entry.parent.mkdir(parents=True)
    shutil.copytree(tiny_model, entry)
    os.link(entry / "model.safetensors", entry / "model-again.safetensors")  # one file, two names
    with open(entry / "sparse.bin", "wb") as handle:  # 1 GiB long, nothing written
        handle.truncate(2**30)
    done = qwen2("list", "--json", home=home)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    du = subprocess.run(["du", "-s", "--block-size=1", str(entry)], capture_output=True, text=True, check=True)
    assert row["size_bytes"] == int(du.stdout.split()[0])
    assert row["size_bytes"] < 2**20


def test_invalid_or_failed_names_leave_no_files(tmp_path):
    home = tmp_path / "home"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"")
    refused(qwen2("import", str(gguf), "--name", "bad name!", home=home), "not a valid model name")
    failed = qwen2("download", "org/missing", home=home, env={"HF_ENDPOINT": "http://127.0.0.1:9"})  # unreachable
    assert failed.returncode == 1
    assert [p for p in home.rglob("*") if p.is_file()] == []
