"""Makes SGLang's Python objects importable on a CPU-only machine, for the peer tests and the CPU demo.

Test-only: puts ``tests/stubs`` (stand-ins for sgl_kernel and torchvision) on ``sys.path`` and tells transformers
that torchvision is absent (our stand-in must not pass for the real thing). Never imported by ``pat_sglang``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parent / "stubs"


def prepare() -> bool:
    """Returns whether sglang can be imported here (after the stand-ins are in place)."""
    if importlib.util.find_spec("sglang") is None:
        return False
    if importlib.util.find_spec("sgl_kernel") is None or importlib.util.find_spec("torchvision") is None:
        sys.path.append(str(STUBS))
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu
    except ImportError:
        return False
    if getattr(sys.modules.get("torchvision"), "__version__", "").endswith("+stub") or str(STUBS) in sys.path:
        iu.is_torchvision_available = tu.is_torchvision_available = lambda: False
    return True


def require() -> None:
    """For a peer-test module: skip it where SGLang is not installed, but under CI (``CI=true``) fail, so that a
    missing or broken SGLang environment can never pass as skipped tests."""
    import pytest

    if prepare():
        return
    reason = "sglang (and transformers) are not importable in this environment"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI runs the peer tests in every SGLang environment", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
