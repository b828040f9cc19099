"""Reading weight files without letting them run code: the one home of every unpickling in the package.

- detectron2 model-zoo .pkl files: a .pkl of weights needs numpy arrays and plain containers; any other
  global a file asks for (os.system, builtins.eval, ...) is refused with a UserError naming it.
- torch files (.pt/.pth/.bin): `torch.load(weights_only=True)`, with torch's advice to retry with
  weights_only=False (which would run the file's code) replaced by what to do instead.
`tests/test_untrusted_files.py` scans the package for any other pickle, torch.load or yaml parsing.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

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


def load_torch_weights_only(path: str | Path, map_location: Any = "cpu", what: str = "torch file") -> Any:
    """torch.load(weights_only=True); a one-line UserError naming `path` for a missing, truncated or
    corrupt file, or one that pickles Python objects besides tensors (whose loading could run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support before refusing or loading: noise for a
            # user whose file either loads or gets the one-line error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text:
            first = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
            raise UserError(f"{path}: holds pickled Python objects besides tensors ({first or 'not weights-only'}); "
                            f"maskformer loads torch files with weights_only=True, so that loading a file cannot "
                            f"run code. Re-save its state dict (torch.save(model.state_dict(), ...))") from None
        raise UserError(f"cannot load {what} {path}: not a readable torch file, possibly truncated or corrupt "
                        f"({e.__class__.__name__}: {text.splitlines()[0] if text else ''})") from None
