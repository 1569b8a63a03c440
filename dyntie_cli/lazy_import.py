"""A module imported on first use: pandas costs a process about 70 MiB of resident memory, which a training
process, whose memory dyntie measures, should not pay for tables it never prints."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attr)


pandas = LazyModule("pandas")
