"""Registers ``--attention-backend pat`` in SGLang lazily; loaded at interpreter start by ``pat_sglang.pth``.

It installs a ``sys.meta_path`` finder and imports nothing else: when (and only when) SGLang's
``srt/server_args.py`` or ``srt/layers/attention/attention_registry.py`` finishes loading, in the launcher or in any
spawned scheduler process, ``pat`` is added to that module's choices or registry. ``PAT_SGLANG_AUTOLOAD=0`` turns it
off; ``pat_sglang.register()`` does the same explicitly.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

SERVER_ARGS = "sglang.srt.server_args"
REGISTRY = "sglang.srt.layers.attention.attention_registry"
BACKEND_NAME = "pat"


def create_pat_backend(runner):
    """SGLang attention-backend factory; imports the backend (torch, triton, sglang) only when a server builds it."""
    from pat_sglang.backend.attn_backend import create_pat_backend as create

    return create(runner)


def add_choice(server_args_module) -> None:
    if BACKEND_NAME not in server_args_module.ATTENTION_BACKEND_CHOICES:
        server_args_module.add_attention_backend_choices([BACKEND_NAME])


def add_factory(registry_module) -> None:
    if BACKEND_NAME not in registry_module.ATTENTION_BACKENDS:
        registry_module.register_attention_backend(BACKEND_NAME)(create_pat_backend)


_HOOKS = {SERVER_ARGS: add_choice, REGISTRY: add_factory}


class _AfterLoad(importlib.abc.Loader):
    def __init__(self, loader, hook) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._hook(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the two SGLang modules through the other finders and runs our hook right after each one loads."""

    def find_spec(self, fullname, path=None, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterLoad(spec.loader, hook)
                return spec
        return None


def install() -> None:
    if os.environ.get("PAT_SGLANG_AUTOLOAD", "1") == "0":
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    # Modules already imported (an interpreter that loaded sglang before this ran) are registered at once.
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
    sys.meta_path.insert(0, _Finder())
