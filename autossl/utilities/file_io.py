"""Atomic writes: a killed process never leaves a half-written file under its final name.

Reading: ``.pkl`` files only as plain data (``load_pickle``), model files only as tensors and
plain data (``load_torch_safely``): nothing named in a file is imported or run."""
from __future__ import annotations

import _compat_pickle
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success rename it onto ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(o: Any):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_json(obj: Any, path: str | os.PathLike, sort_keys: bool = False, indent: int = 4) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=_json_default)


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)


class UnsafePickleError(ValueError):
    """A ``.pkl`` file that holds more than plain data (a class, a function, ...)."""


#: what a ``.pkl`` file may name: containers and scalars, and what numpy arrays, dtypes and
#: scalars pickle as (numpy 1.x ``numpy.core``, 2.x ``numpy._core``). Nothing else is imported.
_SAFE_GLOBALS = {
    ("builtins", n) for n in ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool",
                              "str", "bytes", "bytearray", "slice", "range")
} | {("collections", "OrderedDict"), ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
} | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any other global (a class, a function) is refused, never imported."""

    def __init__(self, f, path, functions: dict[str, Any]):
        super().__init__(f)
        self._path = path
        self._functions = functions

    def find_class(self, module: str, name: str):
        # Python 2 names (protocols 0-2), mapped as ``pickle`` maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if name in self._functions:  # e.g. postprocessing.pkl: a known function, by name only
            return self._functions[name]
        raise UnsafePickleError(
            f"{self._path}: refusing to load {module}.{name} from this pickle file; autossl reads .pkl files as "
            f"plain data only (numbers, strings, lists, dicts, numpy arrays) and never imports or runs code "
            f"named in one")


def load_pickle(path: str | os.PathLike, functions: dict[str, Any] | None = None) -> Any:
    """Read a ``.pkl`` file as plain data (see ``_SAFE_GLOBALS``); ``functions`` maps the names of
    functions the file may reference (from any module) to the objects to use instead. Anything else
    named in the file raises ``UnsafePickleError``: nothing in the file is imported or executed."""
    with open(path, "rb") as f:
        try:
            return _PlainDataUnpickler(f, path, dict(functions or {})).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise UnsafePickleError(f"{path}: not a readable pickle file ({type(e).__name__}: {e})") from None


class UnsafeCheckpointError(ValueError):
    """A model file that cannot be read as tensors and plain data."""


def load_torch_safely(path: str | os.PathLike, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain types only, nothing executed. A file
    that needs an object unpickled (a pickled class, numpy arrays as autossl wrote them before
    its checkpoints held only tensors, a foreign format) or is truncated raises
    ``UnsafeCheckpointError`` naming the file and the first thing refused."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln),
                      lines[0] if lines else type(e).__name__)
        raise UnsafeCheckpointError(
            f"{path}: cannot read it as tensors and plain data ({reason}); autossl never unpickles objects "
            f"from a model file. A checkpoint written by an autossl version before weights-only checkpoints "
            f"must be trained again") from None


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
