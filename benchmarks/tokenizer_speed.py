"""Tokenizer throughput on ~1 MB of mixed text: ours against Hugging Face `tokenizers`, ids checked identical.

python benchmarks/tokenizer_speed.py [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    from devtools.corpus import build_corpus
    from qwen2cli.tokenizer import Qwen2Tokenizer

    if args.model is None:
        from devtools.real_model import real_hf_dir

        args.model = str(real_hf_dir())
    documents = build_corpus()
    text = "\n".join(documents)
    while len(text.encode()) < 1_000_000:
        text += text
    text = text.encode()[:1_000_000].decode("utf-8", errors="ignore")
    lines = text.splitlines(keepends=True)
    ours = Qwen2Tokenizer.from_dir(Path(args.model))
    reference = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, "ids differ"
    expected = [e.ids for e in reference.encode_batch(lines, add_special_tokens=False)]
    assert [ours.encode(line) for line in lines] == expected, "ids differ line by line"
    single_ours = best_of(lambda: ours.encode(text))
    single_ref = best_of(lambda: reference.encode(text, add_special_tokens=False))
    lines_ours = best_of(lambda: [ours.encode(line) for line in lines])
    batch_ref = best_of(lambda: reference.encode_batch(lines, add_special_tokens=False))
    lines_ref = best_of(lambda: [reference.encode(line, add_special_tokens=False) for line in lines])
    print(f"{len(text.encode()) / 1e6:.2f} MB, {len(lines)} lines, ids identical")
    print(
        f"one string:  ours {single_ours * 1e3:8.1f} ms  tokenizers {single_ref * 1e3:8.1f} ms  "
        f"ratio {single_ref / single_ours:.2f}x"
    )
    print(
        f"per line:    ours {lines_ours * 1e3:8.1f} ms  tokenizers encode {lines_ref * 1e3:8.1f} ms  "
        f"ratio {lines_ref / lines_ours:.2f}x"
    )
    print(
        f"per line:    ours {lines_ours * 1e3:8.1f} ms  tokenizers encode_batch {batch_ref * 1e3:8.1f} ms  "
        f"ratio {batch_ref / lines_ours:.2f}x (encode_batch runs on every core; ours on one)"
    )


if __name__ == "__main__":
    main()
