#!/usr/bin/env python3
"""Compile the pack kernel's production tiles for sm90 (H100/H200) on any machine, GPU or not, and print what
decides their speed before a GPU run: registers, the stack frame of spilled registers, shared memory, programs per
SM, spill loads/stores inside the KV loop (SASS), whether the KV loop keeps K/V copies in flight while it computes
(Triton's pipeliner, read from the TTGIR), and whether ptxas had to serialize the asynchronous wgmma products.

Triton compiles for a target without a device (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``) and the
triton wheel ships ptxas and cuobjdump, so this runs on the CPU-only dev machine. Registers are cuobjdump's count of
the cubin Triton built (within a few registers of a launch on the H200, which specializes a few more arguments).

    python scripts/compile_sm90.py --group 4 7 --kv-heads 8 4
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pat_sglang.kernels.pack_attention import TileConfig, kernel_constexprs, programs_per_sm  # noqa: E402
from pat_sglang.packing.tiles import graph_tiles  # noqa: E402

# By module name: the package exports a function of the same name.
pack_module = importlib.import_module("pat_sglang.kernels.pack_attention")
# One H100/H200 SM: 64K registers, 2048 threads, 228 KB of shared memory.
SM90 = SimpleNamespace(
    regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472
)
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    fn=None,
    pointer_types: dict[str, str] | None = None,
):
    """The pack kernel for one tile config, compiled for sm90 (a ``triton.compiler.CompiledKernel``); the Gluon
    kernel (kernels/wide_pack_sm90.py) for a config whose kernel is "wgmma". ``fn``: a variant of that kernel (Triton
    or Gluon) with the same arguments and constexprs (plus extra pointers, typed by ``pointer_types``: name ->
    element type, e.g. scripts/trace_programs.py's trace buffer)."""
    wgmma = cfg.kernel == "wgmma"
    if wgmma:
        from triton.experimental.gluon._runtime import GluonASTSource

        if fn is None:
            from pat_sglang.kernels.wide_pack_sm90 import _wide_pack_kernel as fn
    elif fn is None:
        fn = pack_module._pack_attn_kernel
    consts = kernel_constexprs(
        cfg, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, dtype=_TORCH_DTYPES[dtype], wgmma=wgmma
    )
    elem = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "out_ptr": dtype}
    elem |= {"partial_o_ptr": "fp32", "partial_lse_ptr": "fp32"} | (pointer_types or {})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + elem.get(name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "sm_scale_log2":
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, nargs="+", default=[4, 7], help="GQA groups (q heads per KV head)")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 4], help="KV heads of the model (picks the table)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(_TORCH_DTYPES))
    p.add_argument("--block-m", type=int, nargs="+", help="only these BLOCK_M tiles")
    p.add_argument("--json", action="store_true", help="one JSON object per tile instead of the table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_sm90.py compiles for a GPU target: unset TRITON_INTERPRET")
    if cuda_tools_dir() is None:
        sys.exit("compile_sm90.py needs the ptxas and cuobjdump that ship in the triton wheel")
    if not args.json:
        head = "kv_heads group BLOCK_M BLOCK_N warps stages cap  when         kernel regs  stack_B shared_B per_SM"
        print(head + " copies_in_flight wgmma_serialized loop_spill_ops loop_barriers")
    for kv_heads in args.kv_heads:
        for group in args.group:
            # The tiles a CUDA graph of this head configuration captures (both 16-row tiles where there are two).
            for tile in sorted(graph_tiles(args.head_dim, kv_heads, group), key=lambda c: c.block_m):
                cfg = tile.config
                if args.block_m and cfg.block_m not in args.block_m:
                    continue
                c = inspect_tile(cfg, group=group, head_dim=args.head_dim, num_kv_heads=kv_heads, dtype=args.dtype)
                if args.json:
                    row = {"kv_heads": kv_heads, "when": tile.when, **asdict(c), "config": asdict(cfg)}
                    print(json.dumps(row), flush=True)
                    continue
                print(
                    f"{kv_heads:8d} {group:5d} {cfg.block_m:7d} {cfg.block_n:7d} {cfg.num_warps:5d} "
                    f"{cfg.num_stages:6d} {str(cfg.max_regs):4s} {tile.when:12s} {cfg.kernel:6s} {c.registers:5d} "
                    f"{c.spilled_bytes:8d} {c.shared_bytes:8d} {c.programs_per_sm:6d} {c.copies_in_flight:16d} "
                    f"{str(c.wgmma_serialized):16s} {c.loop_spill_ops:14d} {c.loop_barriers:13d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
