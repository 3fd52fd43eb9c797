"""A small character-level language-modelling corpus from Python's own docs.

The text is the docstrings of a fixed list of standard-library modules and
their public members, read with `inspect.getdoc`: it ships with every Python,
needs no download, and is English prose with some code, which is what a
tiny char-LM should see.  The corpus is deterministic for a given Python
version.  Text is lower-cased and mapped onto a small fixed alphabet (other
characters become '?') to keep the embedding and output layers small.
"""
from __future__ import annotations

import importlib
import inspect
import string

import torch

from .arrays import TokenStreamData

SEQ_LEN = 32
TEST_FRACTION = 0.1
ALPHABET = list(string.ascii_lowercase + string.digits + " \n.,;:'\"()[]-_=*/<>!?")
_MODULES = ("collections", "functools", "itertools", "json", "textwrap", "string",
            "random", "statistics", "fractions", "heapq", "bisect", "os.path",
            "shutil", "argparse", "logging", "unittest", "typing", "pathlib")


def corpus_text() -> str:
    parts = []
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        parts.append(inspect.getdoc(module) or "")
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, name, None))
            if doc and getattr(getattr(module, name), "__module__", None) == module.__name__:
                parts.append(doc)
    return "\n\n".join(parts)


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(ALPHABET)}
    unknown = index["?"]
    return torch.tensor([index.get(c, unknown) for c in text.lower()], dtype=torch.long)


def load_chars_data() -> TokenStreamData:
    tokens = encode(corpus_text())
    n_test = int(TEST_FRACTION * tokens.numel())
    return TokenStreamData(tokens[:-n_test], tokens[-n_test:], SEQ_LEN, ALPHABET)
