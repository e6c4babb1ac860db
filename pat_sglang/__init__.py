"""pat-sglang: prefix-aware decode attention (pack, forward, merge) for SGLang."""

from pat_sglang.packing import Policy
from pat_sglang.wrapper import PatDecodeWrapper

__version__ = "0.1.0"
__all__ = ["PatDecodeWrapper", "Policy", "__version__", "register"]


def register() -> None:
    """Register ``--attention-backend pat`` in SGLang in this process (the installed .pth hook does it lazily)."""
    from pat_sglang.backend import register as _register

    _register()
