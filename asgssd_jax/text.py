"""Character-level language-modelling data from the Python standard library's own source.

Every Python installation carries its standard library as ``.py`` files, so this is real text
that needs no download:

    >>> from asgssd_jax import text
    >>> ds = text.load_python_source(length=128)
    >>> for x, y in text.batches(ds.train, ds.length, 32, seed=0, epoch=0):
    ...     ...  # x, y: int32 [32, 128]; y is x shifted left by one character

Characters are ASCII codes (vocabulary 128); any other character becomes ``"?"``. The train and
test splits are disjoint sets of modules (``TRAIN_MODULES`` and ``TEST_MODULES``), read in a
fixed order. The files differ a little between Python versions, so the corpus (and with it
every figure trained on it) is the same on machines with the same Python version.
"""

from __future__ import annotations

import dataclasses
import itertools
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["TEST_MODULES", "TRAIN_MODULES", "VOCAB_SIZE", "TextDataset", "batches",
           "batches_from", "encode", "decode", "load_python_source", "num_batches"]

VOCAB_SIZE = 128

# Plain, long-lived modules present in every CPython 3.x.
TRAIN_MODULES = (
    "argparse", "ast", "bisect", "calendar", "csv", "dataclasses", "datetime", "difflib",
    "enum", "fnmatch", "fractions", "functools", "heapq", "inspect", "ipaddress", "locale",
    "optparse", "pathlib", "pprint", "random", "shlex", "shutil", "statistics", "string",
    "tarfile", "textwrap", "threading", "typing", "uuid", "zipfile",
)
TEST_MODULES = ("abc", "contextlib", "copy", "decimal", "glob", "gzip", "numbers", "queue",
                "tempfile", "weakref")


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """A character stream per split.

    Attributes:
      name: ``"python_source"``.
      train, test: uint8 character codes, the split's modules concatenated.
      vocab_size: 128.
      length: the context length of the windows :func:`batches` cuts.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    vocab_size: int
    length: int


def encode(s: str) -> np.ndarray:
    """ASCII codes of ``s`` (uint8); other characters become ``"?"``."""
    raw = np.frombuffer(s.encode("utf-32-le"), np.uint32)
    return np.where(raw < VOCAB_SIZE, raw, ord("?")).astype(np.uint8)


def decode(codes: Sequence[int] | np.ndarray) -> str:
    return "".join(chr(int(c)) for c in np.asarray(codes).ravel())


def _module_source(name: str, stdlib: Path) -> str:
    for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(
        f"the standard-library module {name!r} has no source file under {stdlib}; this "
        "dataset needs a Python installation that ships its standard library as .py files")


def load_python_source(length: int = 128, *, max_chars: int | None = None,
                       stdlib: str | Path | None = None) -> TextDataset:
    """The standard library's source as a character-level dataset.

    Args:
      length: context length of the training windows.
      max_chars: keep at most this many characters of each split (small runs and tests).
      stdlib: the directory to read (default: this interpreter's, ``sysconfig``'s ``stdlib``).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])

    def split(modules):
        codes = encode("\n\n".join(_module_source(m, root) for m in modules))
        return codes[:max_chars] if max_chars else codes

    train, test = split(TRAIN_MODULES), split(TEST_MODULES)
    for name, codes in (("train", train), ("test", test)):
        if len(codes) <= length:
            raise ValueError(f"the {name} split has {len(codes)} characters, fewer than one "
                             f"window of {length} + 1; raise max_chars or lower length")
    return TextDataset("python_source", train, test, VOCAB_SIZE, length)


def num_batches(stream: np.ndarray, length: int, batch_size: int) -> int:
    """Number of batches :func:`batches` yields per epoch."""
    return _num_windows(stream, length) // batch_size


def _num_windows(stream: np.ndarray, length: int) -> int:
    # Windows of length + 1 at offset + i * length, for any offset below length.
    return (len(stream) - length) // length


def batches(stream: np.ndarray, length: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
            shuffle: bool = True, drop_remainder: bool = True
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(x, y)`` windows; a pure function of ``(seed, epoch)``.

    The stream is cut into windows of ``length + 1`` characters starting at a random offset
    below ``length`` (so that window boundaries move from epoch to epoch), visited in a random
    order; ``shuffle=False`` gives the fixed windows from offset 0 in order (evaluation).
    ``x`` is a window's first ``length`` characters and ``y`` its last ``length``. With
    ``drop_remainder=False`` a last, smaller batch holds the windows left over.
    """
    if batch_size <= 0 or length <= 0:
        raise ValueError("batch_size and length must be positive")
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(0, length)) if shuffle else 0
    count = _num_windows(stream, length)
    starts = offset + length * (rng.permutation(count) if shuffle else np.arange(count))
    window = np.arange(length + 1)
    for b in range(0, count if not drop_remainder else count - count % batch_size, batch_size):
        rows = stream[starts[b:b + batch_size, None] + window].astype(np.int32)
        yield rows[:, :-1], rows[:, 1:]


def batches_from(stream: np.ndarray, length: int, batch_size: int, start: int, *,
                 seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training batches without end, from batch ``start`` of the sequence that chains
    ``batches(..., epoch=0)``, ``batches(..., epoch=1)``, ...: a run that counts its steps in
    batches rather than passes over the text (``start`` resumes it mid-pass)."""
    per_pass = num_batches(stream, length, batch_size)
    if per_pass < 1:
        raise ValueError(f"{len(stream)} characters hold fewer than {batch_size} windows of "
                         f"{length} + 1: use more text, a smaller batch or a shorter length")
    epoch, skip = divmod(start, per_pass)
    for e in itertools.count(epoch):
        yield from itertools.islice(batches(stream, length, batch_size, seed=seed, epoch=e),
                                    skip if e == epoch else 0, None)
