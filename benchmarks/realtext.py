"""Real text with the length spread of web alt-texts, from what this machine holds.

No LAION shard is reachable here, and uniform synthetic captions hide what padding costs
(one long caption pads a whole encoder batch). This builds a caption list from human-written
text found locally, mixed to the lengths measured on 10,000 real LAION-style alt-texts
(mean 58 characters, 95th percentile 126, longest 2,041):

* Debian package short descriptions (apt's package lists: ~60k one-line descriptions,
  mean 46 characters), mostly alone, sometimes two joined (a caption with a subtitle);
* the first paragraphs of docstrings of the Python standard library, for the long tail
  (100 to 2,041 characters).

`alt_texts(n)` returns the list and `describe(texts)` its length figures, which every
benchmark using it prints. Without apt lists (another distribution) it falls back to the
docstrings alone, cut into sentences, and says so.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import random
import subprocess
import sysconfig

APT_LISTS = "/var/lib/apt/lists"
MAX_CHARS = 2041


def debian_descriptions() -> list[str]:
    return list(_debian_descriptions())


@functools.cache
def _debian_descriptions() -> tuple[str, ...]:
    """Read once per process (a benchmark builds several caption lists)."""
    out: set[str] = set()
    for path in glob.glob(f"{APT_LISTS}/*_Packages*"):
        if path.endswith(".lz4"):
            try:
                data = subprocess.run(["lz4", "-dc", path], check=True, capture_output=True).stdout
            except (OSError, subprocess.CalledProcessError):
                continue
        elif path.endswith(("Packages",)):
            with open(path, "rb") as f:
                data = f.read()
        else:
            continue
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith("Description: "):
                out.add(line[len("Description: "):].strip())
    return tuple(sorted(t for t in out if t))


def docstring_paragraphs(limit: int = 20000) -> list[str]:
    return list(_docstring_paragraphs(limit))


@functools.cache
def _docstring_paragraphs(limit: int) -> tuple[str, ...]:
    """Parsed once per process and limit (~4 s: the standard library's sources)."""
    paras: list[str] = []
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "test" in path or "idlelib" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for para in doc.split("\n\n"):
                    text = " ".join(para.split())
                    if len(text) >= 20 and not text.startswith((">>>", "..", ":")):
                        paras.append(text[:MAX_CHARS])
        if len(paras) >= limit:
            break
    return tuple(paras)


def alt_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    """`n` captions and a line naming their source."""
    rng = random.Random(seed)
    short = debian_descriptions()
    long = [p for p in docstring_paragraphs() if len(p) >= 100]
    if not short:
        sentences = [s.strip() + "." for p in docstring_paragraphs() for s in p.split(". ") if 10 <= len(s) <= 120]
        short, source = sentences, "Python standard library docstring sentences (no apt lists here)"
    else:
        source = "Debian package descriptions + Python standard library docstring paragraphs"
    texts = []
    for _ in range(n):
        u = rng.random()
        if u < 0.79 or not long:
            texts.append(rng.choice(short))
        elif u < 0.962:
            texts.append(f"{rng.choice(short)} - {rng.choice(short)}")
        else:
            texts.append(rng.choice(long))
    # The longest alt-text measured: one caption of exactly that length, as a real corpus has.
    longest = max(long, key=len) if long else ""
    if n > 1000 and longest:
        texts[rng.randrange(n)] = (longest + " " + longest)[:MAX_CHARS]
    return texts, source


def describe(texts: list[str]) -> str:
    import numpy as np

    lengths = np.array([len(t) for t in texts])
    return (
        f"{len(texts)} captions: mean {lengths.mean():.0f} characters, median {np.median(lengths):.0f}, "
        f"95th percentile {np.percentile(lengths, 95):.0f}, longest {lengths.max()}"
    )


if __name__ == "__main__":
    t, src = alt_texts(10000)
    print(src)
    print(describe(t))
