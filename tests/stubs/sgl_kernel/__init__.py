"""Test-only stand-in for sgl_kernel (sglang-kernel), never installed with pat_sglang.

The real wheel needs CUDA libraries, yet sglang imports it (``sgl_kernel.kvcacheio`` and many names) at module level
on paths that decode attention on the CPU never calls. Every submodule imports; every name is an object that raises
only when called (attribute chains such as ``scalar_types.uint4b8`` resolve at import).
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name} is a test stand-in: sgl_kernel is not installed")

    def __repr__(self) -> str:
        return f"<stub {self._name}>"


def _missing_attr(module_name: str):
    def missing(attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{module_name}.{attr}")

    return missing


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _missing_attr(spec.name)  # type: ignore[method-assign]
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.append(_StubFinder())
__version__ = "0.0.0+stub"
__getattr__ = _missing_attr("sgl_kernel")
