"""Compile the pack kernel's tiles for sm90 (H100/H200) on any machine, GPU or not, and read what decides their
speed before a GPU run: registers, the stack frame of spilled registers, shared memory, programs per SM, spill
loads/stores inside the KV loop (SASS), whether the KV loop keeps K/V copies in flight while it computes (Triton's
pipeliner, read from the TTGIR), and whether ptxas had to serialize the asynchronous wgmma products
(scripts/compile_sm90.py prints them; scripts/profile_decode.py and pat_sglang.bench.trace read them).

Triton compiles for a target without a device (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``) and the
triton wheel ships ptxas and cuobjdump, so this runs on the CPU-only dev machine. Registers are cuobjdump's count of
the cubin Triton built (within a few registers of a launch on the H200, which specializes a few more arguments).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pat_sglang.kernels.pack_attention import TileConfig, kernel_constexprs, programs_per_sm

# By module name: the package exports a function of the same name.
pack_module = importlib.import_module("pat_sglang.kernels.pack_attention")
# One H100/H200 SM: 64K registers, 2048 threads, 228 KB of shared memory.
SM90 = SimpleNamespace(
    regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472
)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compiled:
    config: TileConfig
    group: int
    registers: int
    spilled_bytes: int  # the thread's stack frame (spilled registers) and local memory
    # Local-memory loads/stores (spill traffic) in the SASS between the first and the last tensor-core instruction,
    # i.e. inside the KV loop: spills elsewhere (once per work item: its setup and epilogue) cost little.
    loop_spill_ops: int
    # CTA-wide barriers (BAR) in the same span: each one a round trip through shared memory, e.g. a row max or sum
    # reduced across warps or the probabilities handed to the warps of the second product.
    loop_barriers: int
    shared_bytes: int
    programs_per_sm: int
    # K/V tiles whose copies are in flight while the KV loop's products run: for the Triton kernel the cp.async groups
    # its wait leaves outstanding (it issues the next copies after the products: 0 = no overlap inside a program); the
    # Gluon kernel issues tile t + stages - 1 right after waiting for tile t + 1, so stages - 2.
    copies_in_flight: int
    # ptxas could not keep the asynchronous wgmma in flight (its C7512 advisory, "wgmma.mma_async instructions are
    # serialized", e.g. for lack of registers under a cap): every product waits for the one before.
    wgmma_serialized: bool


def cuda_tools_dir() -> Path | None:
    """The folder of the ptxas / cuobjdump that ship in the triton wheel, or None when it is missing."""
    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return d if (d / "ptxas").exists() and (d / "cuobjdump").exists() else None


def compile_tile(
    cfg: TileConfig,
    *,
    group: int,
    head_dim: int = 128,
    num_kv_heads: int = 8,
    dtype: str = "bf16",
    trace: bool = False,
):
    """The pack kernel for one tile config, compiled for sm90 (a ``triton.compiler.CompiledKernel``) as the launcher
    compiles it; the Gluon kernel (kernels/wide_pack_sm90.py) for a config whose kernel is "wgmma". ``trace``: the
    program-tracing build (``pack_attention``'s ``trace=``), else production's (``trace_ptr`` a constexpr None)."""
    wgmma = cfg.kernel == "wgmma"
    if wgmma:
        from triton.experimental.gluon._runtime import GluonASTSource

        from pat_sglang.kernels.wide_pack_sm90 import _wide_pack_kernel as fn
    else:
        fn = pack_module._pack_attn_kernel
    consts = kernel_constexprs(
        cfg,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=TORCH_DTYPES[dtype],
        wgmma=wgmma,
        trace=trace,
    )
    if not trace:
        consts["trace_ptr"] = None  # as the launcher passes it: a constexpr, no kernel argument
    if not wgmma:
        consts["sink_ptr"] = consts["entry_lo_ptr"] = None  # no sinks, no window: production's plain build
    elem = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "out_ptr": dtype}
    elem |= {"partial_o_ptr": "fp32", "partial_lse_ptr": "fp32", "trace_ptr": "i64"}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + elem.get(name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("sm_scale_log2", "logit_cap", "v_scale"):
            signature[name] = "fp32"
        else:  # strides: multiples of 16 elements for the KV layouts the wrapper takes
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.max_regs is not None:
        options["maxnreg"] = cfg.max_regs
    source = (GluonASTSource if wgmma else ASTSource)(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def inspect_tile(cfg: TileConfig, *, group: int, **kwargs) -> Compiled:
    """Compile ``cfg`` for sm90 and read its resources (cuobjdump) and its KV loop's wait (TTGIR)."""
    tools = cuda_tools_dir()
    if tools is None:
        raise RuntimeError("this triton install has no ptxas/cuobjdump for sm90")
    kernel = compile_tile(cfg, group=group, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        # Triton keeps ptxas's advisories to itself: assemble its PTX (the register cap is in it) again to read them.
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        advisories = subprocess.run(
            [str(tools / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "again.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    # Spilled registers live in the thread's stack frame.
    spilled = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    mma = [i for i, line in enumerate(sass) if re.search(r"\b(HMMA|HGMMA)\b", line)]
    in_loop = sass[mma[0] : mma[-1] + 1] if mma else []
    loop_spills = sum(1 for line in in_loop if re.search(r"\b(LDL|STL)\b", line))
    loop_barriers = sum(1 for line in in_loop if re.search(r"\bBAR\b", line))
    ttgir = kernel.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for") :]
    wait = re.search(r"ttg\.async_wait[^\n]*\{num = (\d+)", loop)
    shared = kernel.metadata.shared
    return Compiled(
        config=cfg,
        group=group,
        registers=registers,
        spilled_bytes=spilled,
        loop_spill_ops=loop_spills,
        loop_barriers=loop_barriers,
        shared_bytes=shared,
        programs_per_sm=programs_per_sm(registers, cfg.num_warps, shared, SM90),
        copies_in_flight=cfg.num_stages - 2 if cfg.kernel == "wgmma" else int(wait.group(1)) if wait else 0,
        wgmma_serialized="C7512" in advisories.stdout + advisories.stderr,
    )
