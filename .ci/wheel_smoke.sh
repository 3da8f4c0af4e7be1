#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it (not editable) into a fresh venv, and run the command from a
# directory outside the checkout: --help, the catalogue, and a tiny model's answer.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel -q --no-deps -w "$work/dist" "$repo"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/qwen2cli-*.whl torch==2.13.0
# the tiny checkpoint is written by transformers, which only the development environment has
(cd "$repo" && python -m devtools.tiny_checkpoint "$work/tiny" >/dev/null 2>"$work/tiny.log") || { cat "$work/tiny.log" >&2; exit 1; }

cd "$work"
export QWEN2_HOME="$work/home"
qwen2="$work/venv/bin/qwen2"
# the installed package runs, not the checkout, and the wheel puts nothing but qwen2cli at the top of site-packages
# and it carries every source file of the package (a subpackage missing from pyproject's list would be dropped)
"$work/venv/bin/python" - "$work"/dist/qwen2cli-*.whl "$repo" <<'PY'
import pathlib, sys, zipfile
import qwen2cli
site = pathlib.Path(qwen2cli.__file__).resolve().parents[1]
assert site.name == "site-packages", f"qwen2cli imported from {site}, not from the venv"
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
tops = {name.split("/")[0] for name in names}
stray = sorted(top for top in tops if top != "qwen2cli" and not top.endswith(".dist-info"))
if stray:
    sys.exit(f"the wheel installs top-level names besides qwen2cli: {stray}")
repo = pathlib.Path(sys.argv[2])
wanted = {f"qwen2cli/{p.relative_to(repo / 'qwen2cli')}" for p in (repo / "qwen2cli").rglob("*.py")}
wanted |= {f"qwen2cli/quant/{p.name}" for p in (repo / "quant").iterdir() if p.suffix in (".py", ".c", ".h")}
wanted.add("qwen2cli/models.toml")
missing = sorted(wanted - names)
sys.exit(f"the wheel lacks {len(missing)} package files, e.g. {missing[:5]}" if missing else 0)
PY
"$qwen2" --help >/dev/null
"$qwen2" models >/dev/null
"$qwen2" run "$work/tiny" --raw "hello" --max-tokens 4 --temperature 0 >/dev/null
echo "wheel smoke: the installed qwen2 ran --help, models and run from outside the checkout"
