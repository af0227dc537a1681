"""Run Triton kernels on the CPU: import this before triton. Without CUDA it sets
TRITON_INTERPRET=1 and mends a Triton 3.6 interpreter bug; with CUDA it does nothing."""

from __future__ import annotations

import os

import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)), which
    numpy >= 2.4 refuses (triton-lang/triton#9171): loops with run-time bounds then fail."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "tandem_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.tandem_fixed = True
    interpreter._patch_lang_tensor = patched


def setup() -> None:
    """Call after pytest.importorskip("triton")."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        _fix_interpreter_scalar_index()
