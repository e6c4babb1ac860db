"""pat-sglang: prefix-aware decode attention (pack, forward, merge) for SGLang."""

from pat_sglang.packing import Policy
from pat_sglang.wrapper import PatDecodeWrapper

__version__ = "0.1.0"
__all__ = ["PatDecodeWrapper", "Policy", "__version__"]
