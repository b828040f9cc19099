"""Unpickling detectron2 model-zoo .pkl files without letting them run code.

A .pkl of weights needs numpy arrays and plain containers; any other global a file asks for (os.system,
builtins.eval, ...) is refused with a UserError naming it.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from pathlib import Path
from typing import Any

from maskformer_cli.errors import UserError

# Exactly what a detectron2 .pkl of numpy arrays needs. Anything else (os.system, builtins.eval, ...) is a
# global the file has no business importing.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles carry bytes (the array buffers)
}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                  "bytearray", "bool"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str) -> None:
        super().__init__(file, encoding="latin1")  # as detectron2 reads them (Python-2-era pickles)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Judge the name Python 3 will actually import (protocol-2 files say __builtin__, copy_reg, ...).
        mod, nm = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        mod = _compat_pickle.IMPORT_MAPPING.get(mod, mod)
        if (mod, nm) in _SAFE_GLOBALS or (mod == "builtins" and nm in _SAFE_BUILTINS):
            return super().find_class(module, name)
        if mod.startswith("numpy") and nm.endswith("DType") and "." not in nm:  # numpy 2 dtype classes
            return super().find_class(module, name)
        raise UserError(
            f"{self.source}: refusing to load '{mod}.{nm}': a weights .pkl should hold only arrays and "
            f"plain containers (this file could run code when unpickled)"
        )


def load_pickle_restricted(path: str | Path) -> Any:
    """Unpickle a detectron2-style .pkl allowing only numpy arrays and plain containers (see _SAFE_GLOBALS)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except UserError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise UserError(f"{path}: not a readable .pkl ({e.__class__.__name__}: {e})") from None
