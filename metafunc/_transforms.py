"""Which ``torch.func`` transforms are active: lets a layer or a gradient pick the fastest exact
implementation (private torch API, guarded; when it cannot be read, as while ``torch.compile``
traces, the safe choice is made)."""

from __future__ import annotations

__all__ = ["any_transform", "under_grad", "under_vmap"]


def _keys() -> list[str] | None:
    """The names of the active transforms, innermost last (``'Grad'``, ``'Vmap'``...), or
    ``None`` when they cannot be read. Read from torch's C++ interpreter stack: the Python
    wrappers of ``retrieve_all_functorch_interpreters`` add Python work to every call, and
    batch norms ask at every layer."""
    import torch

    if torch.compiler.is_compiling():  # dynamo cannot read the stack: make the safe choice
        return None
    try:
        return [i.key().name for i in torch._C._functorch.get_interpreter_stack() or ()]
    except (AttributeError, RuntimeError):  # pragma: no cover - other torch
        return None


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active; ``True`` when that cannot be told."""
    keys = _keys()
    return True if keys is None else "Vmap" in keys


def any_transform() -> bool:
    """Whether any ``torch.func`` transform (grad, vmap, jvp...) is active; ``True`` when that
    cannot be told."""
    keys = _keys()
    return True if keys is None else bool(keys)


def under_grad() -> bool:
    """Whether a ``torch.func`` differentiation transform (grad, vjp, jvp) is active; ``True``
    when that cannot be told."""
    keys = _keys()
    return True if keys is None else any(k in ("Grad", "Jvp") for k in keys)
