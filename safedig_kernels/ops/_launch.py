"""Launch settings of the Triton kernels, in one place: the heuristics, the thresholds between
paths, and `LaunchConfig`, the one object a tuning sweep passes to a launcher.

A launcher takes `launch: LaunchConfig | None`; None means `DEFAULT`, read when the launcher
runs (tests and the host-overhead benchmark swap it). A field left None takes the heuristic's
choice, so `LaunchConfig(chunk=4096)` changes the chunk and nothing else. Every setting keeps
the result exact: the selection algorithms, tiles and warps differ in speed only
(`bias_in_gemm` excepted: it moves a rounding).

Measured facts behind the defaults are dated next to each choice (H200, torch 2.11 / Triton
3.6, `benchmarks/gpu_check.py`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

import torch

from .._library import mm_has_out_dtype
from ._triton import cdiv, next_pow2

# Bytes of pre-activations materialised at once; larger inputs are processed in row chunks.
PRE_BUFFER_BYTES = 1 << 30

# "split": four launches, the two that read the pre-activations made of many small programs
# (group maxima per (row, chunk); bound per row; candidates per (row, chunk); rank per row).
# "row": one program per row does all of it. Both are exact and tested. "auto" picks by rows,
# from the sweep of 2026-11-28 (selection alone, CUDA events): "row" at N = 16 and 256 (0.17
# against 0.38 ms: one launch where split makes four, and small N is launch-bound), "split" at
# the FLUX 4x shape (0.212-0.220 against 0.223 ms). The crossover between 256 and 4608 rows
# was not measured; benchmarks/gpu_check.py sweeps both.
SELECT_ALGOS = ("split", "row")
ROW_ALGO_MAX_ROWS = 256

# Up to this many tokens steer runs as the GEMM plus one kernel (each program selects its
# token's codes, then steers all of its d): there the op is bound by host launch cost (N = 16
# took 0.32 ms per eager call against 0.05 ms replayed from a CUDA graph, 2026-11-28). Not yet
# measured on a GPU; benchmarks/gpu_check.py compares both paths at N = 16, 64, 256.
ONE_LAUNCH_MAX_ROWS = 64

# How the ops' backward runs on CUDA tensors: "triton", the sparse kernels (per token, the k
# selected rows of W_dec and W_enc^T; per feature, the rows of the tokens that chose it, summed in
# token order without atomics), or "torch", the reference's backward in the input dtype (the k
# codes scattered into a dense [N, F] matrix, four cuBLAS GEMMs of N*F*d). Both are deterministic
# and sync-free. "triton" reads N*k rows where "torch" multiplies N*F*d (F/k = 384 times the
# FLOPs at FLUX 4x), hence the default; neither has been timed on a GPU yet (2026-12):
# benchmarks/device_run.sh's "backward" stage times both and should decide.
BACKWARDS = ("triton", "torch")


@dataclass(frozen=True)
class LaunchConfig:
    """Overrides of the launch heuristics; None keeps the heuristic's choice.

    select_algo: "auto", "row" or "split" (the selection kernels, above).
    chunk, select_warps, select_stages: row elements held at once, warps and software-pipelined
        chunk loads of the selection programs (`select_config`).
    decode_block_d, decode_k_block, decode_warps: the decode tile `[K_BLOCK, BLOCK_D]` and warps
        (`decode_config`).
    one_launch: steer as one kernel after the GEMM (None: up to ONE_LAUNCH_MAX_ROWS tokens when
        the selection is "row", or whenever `persistent`).
    pre_dtype: dtype of the pre-activation buffer (`pre_dtype_for`).
    bias_in_gemm: add the folded encoder bias in the GEMM (`torch.addmm`, cuBLASLt's bias
        epilogue, one rounding after the bias) instead of on load in the selection kernels
        (`bias_in_gemm`). Unlike the other settings it changes the rounding of bf16 codes.
    persistent, programs: the one-launch path on a fixed grid of `programs` programs (default
        8 per SM) that loop over the tokens, instead of one program per token
        (`persistent_programs`). Not yet measured on a GPU; off unless asked.
    backward: "triton" or "torch" (BACKWARDS, above). Like bias_in_gemm it moves roundings:
        "torch" computes the gradients in the input dtype.
    backward_block_d, backward_rows, backward_warps: the backward kernels' tile, `[rows, BLOCK_D]`
        decoder/encoder rows or per-feature token rows at once, and warps (`backward_config`).
    """

    select_algo: str = "auto"
    chunk: Optional[int] = None
    select_warps: Optional[int] = None
    select_stages: Optional[int] = None
    decode_block_d: Optional[int] = None
    decode_k_block: Optional[int] = None
    decode_warps: Optional[int] = None
    one_launch: Optional[bool] = None
    pre_dtype: Optional[torch.dtype] = None
    bias_in_gemm: Optional[bool] = None
    persistent: Optional[bool] = None
    programs: Optional[int] = None
    backward: str = "triton"
    backward_block_d: Optional[int] = None
    backward_rows: Optional[int] = None
    backward_warps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.select_algo != "auto" and self.select_algo not in SELECT_ALGOS:
            raise ValueError(f"algo must be 'auto' or one of {SELECT_ALGOS}, got {self.select_algo!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
        if self.programs is not None and (not isinstance(self.programs, int) or self.programs < 1):
            raise ValueError(f"programs must be a positive int, got {self.programs!r}")


DEFAULT = LaunchConfig()


def current(launch: Optional[LaunchConfig]) -> LaunchConfig:
    """`launch`, or the module's `DEFAULT` as it is now."""
    return launch if launch is not None else DEFAULT


def row_passes(N, F: int, pre_dtype: torch.dtype) -> list[tuple]:
    """(start, stop) of each pass of rows whose pre-activations are materialised at once
    (PRE_BUFFER_BYTES): one pass unless the buffer would pass its size. A symbolic N
    (dynamic=True) is compared once, an inequality guard, never iterated over (that would
    specialise it)."""
    per_pass = max(1, PRE_BUFFER_BYTES // (F * torch.finfo(pre_dtype).bits // 8))
    if N <= per_pass:
        return [(0, N)]
    return [(start, min(N, start + per_pass)) for start in range(0, N, per_pass)]


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(launch: Optional[LaunchConfig], device: torch.device) -> Optional[int]:
    """The persistent one-launch grid size, or None for a program per token."""
    launch = current(launch)
    if not launch.persistent:
        return None
    if launch.programs is not None:
        return launch.programs
    return 8 * _multiprocessors(device) if device.type == "cuda" else 4  # the interpreter: a few, to loop


def symbolic(rows) -> bool:
    """Whether `rows` is a symbolic size: torch.compile(dynamic=True) tracing the ops' bodies.
    Comparing it with a threshold would add a guard, and a later N on the other side of the
    threshold would recompile; so the heuristics below take, for a symbolic N, the path that
    serves every N (the large-N one) and compare nothing."""
    return isinstance(rows, torch.SymInt)


def resolve_select_algo(launch: Optional[LaunchConfig], rows: int) -> str:
    """The selection algorithm that runs for `rows` rows."""
    algo = current(launch).select_algo
    if algo == "auto":
        return "row" if not symbolic(rows) and rows <= ROW_ALGO_MAX_ROWS else "split"
    return algo


def use_one_launch(launch: Optional[LaunchConfig], rows: int) -> bool:
    """Whether steer runs as the GEMM plus `_steer_row_kernel` alone."""
    launch = current(launch)
    if launch.one_launch is not None:
        return launch.one_launch
    if launch.persistent:
        return True
    if symbolic(rows):
        return False
    return rows <= ONE_LAUNCH_MAX_ROWS and resolve_select_algo(launch, rows) == "row"


def pre_dtype_for(x_dtype: torch.dtype, device: torch.device, launch: Optional[LaunchConfig] = None) -> torch.dtype:
    """Pre-activation buffer dtype. bf16 stays bf16 (written once, read once; on an H200 the
    fp32 buffer cost 0.03 ms more to write and more to read, for no change in what a bf16 model
    can resolve). fp16 goes to fp32 where cuBLAS can write it: DiT activations overflow fp16
    pre-activations."""
    chosen = current(launch).pre_dtype
    if chosen is not None:
        return chosen
    if x_dtype == torch.float16 and (device.type != "cuda" or mm_has_out_dtype()):
        return torch.float32
    return x_dtype


def bias_in_gemm(x_dtype: torch.dtype, pre_dtype: torch.dtype, launch: Optional[LaunchConfig] = None) -> bool:
    """Whether the GEMM adds the encoder bias. fp32: always (addmm). bf16: not by default: on an
    H200 (2026-11-28) addmm with an fp32 bias and fp32 output took 0.65 ms at the FLUX 4x shape
    against 0.47-0.49 ms for mm; the bf16-output epilogue, which would let the selection read
    a third of the bytes it reads now, is not yet measured (benchmarks/device_run.sh times it).
    fp16 with fp32 pre-activations keeps the bias on load."""
    if x_dtype == torch.float32:
        return True
    chosen = current(launch).bias_in_gemm
    return bool(chosen) and pre_dtype == x_dtype


@functools.lru_cache(maxsize=256)
def select_config(F: int, k: int, launch: Optional[LaunchConfig] = None) -> Mapping:
    """Constexprs and warps of the selection kernels (read-only, cached: it runs on every call).

    CHUNK elements of the row are held at once (more per chunk: fewer loop trips, more
    registers); GROUPS = 2 * next_pow2(k) groups leave ~1.2 k candidates on random data, and
    CAND = 4 * next_pow2(k) scratch slots leave room for skewed rows before the exact fallback
    (always taken for k > 64). 2048-element chunks and 4 warps beat 4096/8192 and 8/16 warps at
    the FLUX 4x shape (2026-11-28). The candidate ranking compares [CAND, RANK_BLOCK] blocks;
    RANK_BLOCK shrinks below 4 warps so 1- and 2-warp programs fit their registers without
    spilling (swept, not yet measured). LOAD_STAGES > 1 pipelines the "row" kernel's chunk loads
    (swept, not yet measured; 1: plain loops).
    """
    launch = current(launch)
    num_warps = launch.select_warps or 4
    k_pow2 = next_pow2(k)
    chunk = launch.chunk or min(next_pow2(F), 2048)
    exact_only = k_pow2 > 64
    groups = min(2 * k_pow2, chunk)
    if groups < k:  # a chunk this small cannot give k groups: the bound would not hold
        exact_only = True
    cand = k_pow2 if exact_only else 4 * k_pow2
    num_chunks = cdiv(F, chunk)
    return MappingProxyType(dict(
        CHUNK=chunk, NUM_CHUNKS=num_chunks, CHUNKS_POW2=next_pow2(num_chunks), GROUPS=max(groups, 1),
        CAND=cand, RANK_BLOCK=min(cand, 32, 8 * num_warps), EXACT_ONLY=exact_only, num_warps=num_warps,
        LOAD_STAGES=launch.select_stages or 1,
    ))


@functools.lru_cache(maxsize=256)
def decode_config(d: int, k: int, launch: Optional[LaunchConfig] = None) -> Mapping:
    """Tile and warps of the decode kernels (read-only, cached). A program holds a
    [K_BLOCK, BLOCK_D] tile of decoder rows. At the FLUX 4x shape [8, 1024] tiles with 4 warps
    took 0.17 ms, [16, 512] 0.39 ms and [8, 256] 2.1 ms (2026-11-28): wide rows per program win."""
    launch = current(launch)
    return MappingProxyType(dict(K_BLOCK=launch.decode_k_block or min(next_pow2(k), 8),
                                 BLOCK_D=launch.decode_block_d or min(next_pow2(d), 1024),
                                 num_warps=launch.decode_warps or 4))


@functools.lru_cache(maxsize=256)
def backward_config(d: int, k: int, launch: Optional[LaunchConfig] = None) -> Mapping:
    """Tiles and warps of the backward kernels (read-only, cached): a program reads K_BLOCK of a
    token's selected rows (decoder rows for the dot products with grad_y, encoder rows for dx),
    or PAIRS token rows of one feature (the weight gradients), BLOCK_D columns at a time. The
    forward decode's [8, 1024] with 4 warps, the best of its sweep (decode_config), until the
    backward has a sweep of its own; not yet measured on a GPU."""
    launch = current(launch)
    rows = next_pow2(launch.backward_rows or 8)  # tile sides are powers of two (tl.arange)
    return MappingProxyType(dict(K_BLOCK=min(next_pow2(k), rows), PAIRS=rows,
                                 BLOCK_D=next_pow2(launch.backward_block_d or min(d, 1024)),
                                 num_warps=launch.backward_warps or 4))
