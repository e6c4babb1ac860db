"""Test-only stand-in for torchvision (never installed with pat_sglang).

PyPI's torchvision cannot load beside the CPU torch 2.13 of the dev/CI machines, yet sglang imports a few of its
names at module level for image models (``torchvision.io.decode_jpeg``, ``torchvision.transforms``), which decode
attention never touches. Every name here is an object that raises only when called.
"""

import sys
import types


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name} is a test stand-in: torchvision is not installed")


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)

    def missing(attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{name}.{attr}")

    mod.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules[name] = mod
    return mod


__version__ = "0.0.0+stub"
io = _module("torchvision.io")
transforms = _module("torchvision.transforms")
transforms.functional = _module("torchvision.transforms.functional")
transforms.v2 = _module("torchvision.transforms.v2")
transforms.v2.functional = _module("torchvision.transforms.v2.functional")
