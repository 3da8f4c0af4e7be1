"""`qwen2 run "prompt"` and `qwen2 chat "message"`: a lone argument that names no model is the prompt, answered by
the catalogue's default model; `-m/--model` names the model explicitly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2cli.errors import ModelNotFound
from qwen2cli.registry import load_catalog, split_model_and_prompt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def catalogue(tiny_model, tmp_path, monkeypatch) -> Path:
    """A catalogue whose default is the tiny model's directory, one alias, and a store holding one model."""
    path = tmp_path / "models.toml"
    path.write_text(f'default = "{tiny_model}"\n\n[models."qwen-demo"]\nhf = "Org/Qwen-Demo"\n', encoding="utf-8")
    home = tmp_path / "home"
    shutil.copytree(tiny_model, home / "models" / "installed-tiny")
    monkeypatch.setenv("QWEN2_CATALOG", str(path))
    monkeypatch.setenv("QWEN2_HOME", str(home))
    return path


def split(first, second=None, *, model=None):
    return split_model_and_prompt(first, second, model=model, catalog=load_catalog())


@pytest.mark.parametrize(
    "argument",
    ["qwen-demo", "QWEN-DEMO", "installed-tiny", "Qwen/Qwen2.5-0.5B-Instruct", "some-org/some.model_v2"],
)
def test_a_model_name_is_the_model(catalogue, argument):
    assert split(argument) == (argument, None)


def test_an_existing_path_is_the_model(catalogue, tiny_model):
    assert split(str(tiny_model)) == (str(tiny_model), None)


@pytest.mark.parametrize(
    "argument", ["Summarize these commits in one line:", "hi", "what is 1/2?", "Explain org/name ids", "hello:", ""]
)
def test_anything_else_is_the_prompt(catalogue, argument):
    assert split(argument) == (None, argument)


@pytest.mark.parametrize("argument", ["qwen-dmeo", "./no-such-dir", "missing.gguf"])
def test_a_word_meant_as_a_model_that_names_none_is_an_error(catalogue, argument):
    with pytest.raises(ModelNotFound):
        split(argument)


def test_two_arguments_are_model_and_prompt(catalogue):
    assert split("hi", "there") == ("hi", "there")


def test_model_option_makes_every_argument_the_prompt(catalogue):
    assert split("qwen-demo", "there", model="installed-tiny") == ("installed-tiny", "qwen-demo there")
    assert split(None, model="installed-tiny") == ("installed-tiny", None)


# -- through the command -------------------------------------------------------------------------------------


def shell(command: str, catalogue: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QWEN2_CATALOG": str(catalogue), "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    env["QWEN2_HOME"] = str(catalogue.parent / "home")
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)


QWEN2 = f"{sys.executable} -m qwen2cli"
GREEDY = "--temperature 0 --max-tokens 6 --json"


def test_piped_run_with_only_a_prompt_uses_the_default_model(catalogue, tiny_model):
    prompt = "Summarize these commits in one line:"
    implicit = shell(f"git log -3 --oneline | {QWEN2} run '{prompt}' {GREEDY}", catalogue)
    assert implicit.returncode == 0, implicit.stderr
    explicit = shell(f"git log -3 --oneline | {QWEN2} run -m {tiny_model} '{prompt}' {GREEDY}", catalogue)
    assert explicit.returncode == 0, explicit.stderr
    answer, reference = json.loads(implicit.stdout), json.loads(explicit.stdout)
    # the same prompt to the same model (greedy text may differ: the second run reuses the template's cached opening,
    # and a random tiny model's near-tied logits flip on such rounding)
    assert answer["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"] > 20  # the piped log is in it
    # and it is the catalogue's default that answers: with the default gone, the same command names it
    catalogue.write_text(f'default = "{tiny_model}-gone"\n', encoding="utf-8")
    gone = shell(f"git log -3 --oneline | {QWEN2} run '{prompt}' {GREEDY}", catalogue)
    assert gone.returncode == 1 and f"{tiny_model}-gone" in gone.stderr, gone.stderr


def test_run_with_one_word(catalogue):
    done = shell(f"{QWEN2} run hi {GREEDY}", catalogue)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] >= 1


def test_run_with_a_mistyped_alias_says_so(catalogue):
    done = shell(f"{QWEN2} run qwen-dmeo", catalogue)
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "error: unknown model 'qwen-dmeo'; did you mean qwen-demo? (-m MODEL sends it as a prompt)"
    )


def test_chat_with_a_first_message(catalogue):
    done = shell(f"echo thanks | {QWEN2} chat 'hello there' --max-tokens 3", catalogue)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("prompt tokens") == 2  # the message from the command line, then the piped line
