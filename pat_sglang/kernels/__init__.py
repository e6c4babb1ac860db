"""Triton kernels, their typed launchers and the fp32 torch references. No SGLang, no trees."""

from pat_sglang.kernels.common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, interpreting
from pat_sglang.kernels.merge import merge_partials
from pat_sglang.kernels.pack_attention import PackItems, TileConfig, default_sm_scale, pack_attention
from pat_sglang.kernels.reference import attention_reference, decode_attention_reference, merge_reference

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "PackItems",
    "TileConfig",
    "attention_reference",
    "decode_attention_reference",
    "default_sm_scale",
    "interpreting",
    "merge_partials",
    "merge_reference",
    "pack_attention",
]
