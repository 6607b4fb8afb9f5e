"""Unpickling that refuses code: dataset pickles may hold plain data and NumPy arrays, nothing else.

A pickle names importable callables and calls them while it loads, so :func:`pickle.load` on a
downloaded file runs whatever its author chose (``os.system`` included). The dataset pickles read
here (CIFAR-100's python files, tiered-ImageNet's release) hold only dicts, lists, tuples, str,
bytes, numbers and NumPy arrays, which need no imports but NumPy's array rebuilders.
:func:`safe_load` allows exactly those, and refuses any other import before anything from the file
runs.
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import IO, Any

__all__ = ["UnsafePickleError", "safe_load"]

# What a data pickle may import: NumPy's array, dtype and scalar rebuilders (NumPy 1 and 2 module
# paths; _frombuffer for protocol 5), and the call Python 3 pickles bytes with below protocol 3.
_ALLOWED = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})  # fmt: skip


class UnsafePickleError(ValueError):
    """A pickle asked to import something other than NumPy's array rebuilders; nothing ran."""


class _Restricted(pickle.Unpickler):
    def __init__(self, file: IO[bytes], *, path: str | os.PathLike[str], call: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1: NumPy arrays pickled by Python 2
        self._path, self._call = path, call

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"{self._call}: refused to unpickle {self._path}: it asks to import "
                f"{module}.{name}, but a dataset file holds only lists, dicts, str, bytes, numbers "
                "and NumPy arrays, and what a pickle imports it can run. Nothing from the file was "
                "run; replace it with a copy of the official release."
            )
        modern = module.replace("numpy.core", "numpy._core")  # NumPy 2 moved numpy.core
        for candidate in (modern, module.replace("numpy._core", "numpy.core")):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"NumPy has no {module}.{name}")


def safe_load(path: str | os.PathLike[str], *, call: str, fix: str) -> Any:
    """Unpickle ``path`` allowing only plain data and NumPy arrays.

    Args:
        path: the pickle file.
        call: the public call, named in error messages.
        fix: what the user does about a corrupt file (the last sentence of the error).

    Raises:
        UnsafePickleError: the file asks for any other import (naming the file and the import).
        ValueError: the file is not a readable pickle.
    """
    try:
        with open(path, "rb") as f:
            return _Restricted(f, path=path, call=call).load()
    except UnsafePickleError:
        raise
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
        IndexError, KeyError,
    ) as err:  # fmt: skip
        raise ValueError(
            f"{call}: cannot unpickle {path} ({type(err).__name__}: {err}); the file is corrupt "
            f"or not the expected one. {fix}"
        ) from err
