"""A multilingual test corpus built from this machine's own text: gettext catalogues, stdlib source, edge cases."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

EDGE_CASES = [
    "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 🇯🇵 JP, ❤️‍🔥",
    "e\u0301 (combining acute) a\u0308 n\u0303 \u1e9b\u0323 Å vs A\u030a, ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ",
    "zero\u200bwidth\u200cjoiner\u200dand\ufeffbom\u2060word joiner",
    "   leading spaces\t\ttabs   \n\n\n   trailing   ",
    "windows\r\nline\r\nendings\r\n\r\n",
    "digits 1234567890 0.000001 1,000,000 ١٢٣ ४५६ 一二三",
    "literal specials: <|im_start|>user\nhi<|im_end|> <|endoftext|> <|im_start|>",
    "中文：我爱北京天安门。日本語：東京は大きい。한국어: 서울은 크다. ไทย: ภาษาไทย",
    "Ελληνικά, עברית, العربية, हिन्दी, বাংলা, தமிழ், ქართული, Հայերեն, አማርኛ",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D ſ 'ſ K Kelvin",
    "\u00a0nbsp\u2003em space\u3000ideographic\u2028line sep\u2029para sep\x85nel",
    "mixed\u202eRTL override\u202c and \U0001d54f\U0001d552\U0001d565\U0001d559 math letters",
]


def gettext_corpus(*, per_language: int = 3, max_chars: int = 20000) -> dict[str, str]:
    """Language code -> translated text from the .mo catalogues under /usr/share/locale, read with msgunfmt."""
    msgunfmt = shutil.which("msgunfmt")
    if msgunfmt is None:
        raise RuntimeError("msgunfmt not found: install gettext (apt-get install gettext)")
    texts: dict[str, str] = {}
    for language_dir in sorted(Path("/usr/share/locale").iterdir()):
        catalogues = sorted((language_dir / "LC_MESSAGES").glob("*.mo"))[:per_language]
        parts = []
        for catalogue in catalogues:
            done = subprocess.run([msgunfmt, str(catalogue)], capture_output=True, text=True, errors="replace")
            parts.append(done.stdout)
        text = "".join(parts)[:max_chars]
        if text.strip():
            texts[language_dir.name] = text
    return texts


def stdlib_sources(*, count: int = 12) -> list[str]:
    """Source text of a few standard-library modules (code, comments, docstrings)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = [
        "json/decoder.py",
        "argparse.py",
        "textwrap.py",
        "difflib.py",
        "csv.py",
        "string.py",
        "heapq.py",
        "bisect.py",
        "colorsys.py",
        "fractions.py",
        "shlex.py",
        "ipaddress.py",
    ][:count]
    return [(stdlib / name).read_text(encoding="utf-8") for name in names if (stdlib / name).is_file()]


def build_corpus(*, min_languages: int = 20) -> list[str]:
    """The whole corpus as a list of documents; fails loudly when too few languages are on this machine."""
    languages = gettext_corpus()
    if len(languages) < min_languages:
        raise RuntimeError(f"only {len(languages)} languages of gettext catalogues found; need {min_languages}")
    return list(languages.values()) + stdlib_sources() + EDGE_CASES


PERPLEXITY_TEXT_CHARS, PERPLEXITY_CTX = 12_000, 512  # what the real perplexity tests score: 5 windows of 512


def documentation_text(limit: int = 40_000) -> str:
    """English prose from this machine's documentation: the licence texts every Debian system has."""
    parts = [p.read_text(errors="ignore") for p in sorted(Path("/usr/share/common-licenses").glob("*")) if p.is_file()]
    text = "\n\n".join(parts)
    if len(text) < 10_000:
        raise RuntimeError("too little documentation text on this machine for the perplexity tests")
    return text[:limit]
