"""Character-level language modelling on any UTF-8 text file.

The vocabulary is the set of characters in the file (token id = rank in sorted order). Sample
`i` of a split is the window of `block_size` characters starting at `i * stride`; its targets
are the same window shifted by one character. The last `eval_fraction` of the text is held out
as one contiguous piece, so no evaluation window overlaps a training one.

`data.text_path: stdlib:MODULE` names the source file of a module that ships with Python: the
default, `stdlib:pydoc_data.topics`, is the ~750 kB of help text behind `help()` (English prose
and code examples), present in every CPython build that ships its standard library as source,
so the example needs no download.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from mpiml.config import DataConfig
from mpiml.data.samples import Dataset
from mpiml.errors import DataError

STDLIB = "stdlib:"


class TokenWindows:
    """Windows of `block` token ids over a 1-D token array; targets are shifted by one."""

    def __init__(self, tokens: np.ndarray, block: int, stride: int, source: str) -> None:
        self.tokens, self.block, self.stride, self.source = tokens, block, stride, source
        self._offsets = np.arange(block, dtype=np.int64)
        self._n = max(0, (len(tokens) - 1 - block) // stride + 1)

    def __len__(self) -> int:
        return self._n

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.asarray(idx, dtype=np.int64)[:, None] * self.stride + self._offsets
        return self.tokens[pos].astype(np.int64), self.tokens[pos + 1].astype(np.int64)


def resolve_text_path(spec: str) -> Path:
    """A plain path, or `stdlib:MODULE` for the source file of a module shipped with Python."""
    if not spec.startswith(STDLIB):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"data.text_path: no file at {path}. HINT: give any UTF-8 text file, "
                            f"or {STDLIB}pydoc_data.topics for a text that ships with Python")
        return path
    module = spec[len(STDLIB):]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    origin = getattr(found, "origin", None)
    if origin is None or not origin.endswith(".py") or not Path(origin).is_file():
        raise DataError(
            f"data.text_path = {spec!r}: this Python ({sys.version.split()[0]}, {sys.prefix}) "
            f"has no source file for module '{module}' (not installed, or a build that ships "
            "only compiled .pyc files). HINT: set data.text_path to any UTF-8 text file")
    return Path(origin)


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"data.text_path: cannot read {path}: {err.strerror or err}") from err
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"data.text_path: {path} is not UTF-8 text (byte {err.start:,}, line "
                        f"{line}: {err.reason}). HINT: convert it, e.g. `iconv -f latin1 -t "
                        "utf-8`, or give another file") from None


def encode(text: str) -> tuple[np.ndarray, str]:
    """Token ids for each character, and the vocabulary (characters in id order)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars, tokens = np.unique(codes, return_inverse=True)
    dtype = np.uint8 if len(chars) <= 256 else np.int32
    return tokens.astype(dtype), "".join(chr(int(c)) for c in chars)


def load_text_dataset(cfg: DataConfig) -> Dataset:
    """Windows of `cfg.block_size` characters; the last `eval_fraction` of the text held out."""
    path = resolve_text_path(cfg.text_path)
    text = read_text(path)
    block, stride = cfg.block_size, cfg.stride or cfg.block_size
    cut = len(text) - int(round(cfg.eval_fraction * len(text)))
    need = block + 1
    if cut < need or (cfg.eval_fraction > 0 and len(text) - cut < need):
        raise DataError(f"data.text_path: {path} is too short: {len(text):,} characters leave "
                        f"{cut:,} for training and {len(text) - cut:,} for evaluation, and each "
                        f"split needs at least data.block_size + 1 = {need}. HINT: use a longer "
                        "text or a smaller data.block_size")
    tokens, vocab = encode(text)
    source = f"data.text_path: {path}"
    train = TokenWindows(tokens[:cut], block, stride, source)
    held = TokenWindows(tokens[cut:], block, block, source)
    return Dataset(train, held, (block,), len(vocab), kind="tokens", vocab=vocab)
