"""dyntie: train transformers with dynamic layer tying (David-Hay & Wolf, ICLR 2024).

``load_tied`` (a ``dyntie export`` folder with real sharing) and the loop API (``DynamicTying``,
``DynamicTyingCallback``) import on first use, so ``import dyntie_cli`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"load_tied": "export", "DynamicTying": "tying", "DynamicTyingCallback": "trainer_callback"}
__all__ = ["DynamicTying", "DynamicTyingCallback", "__version__", "load_tied"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
