"""What is timed: seeded inputs per shape, the providers of each op, and their oracles.

Providers (one setup factory each, `BUILDERS[(op, provider)](prepared) -> fn`, `fn()` is the
timed call):

| provider | what runs |
|---|---|
| `fused` | `torch.ops.safedig.*` (Triton on CUDA; the PyTorch reference on CPU tensors) |
| `fused_cudagraph` | `safedig::steer` captured once in a CUDA graph and replayed (CUDA, N <= 64) |
| `eager_reference` | `safedig_kernels.reference.*(..., upcast=False)`: the spec, in the input dtype |
| `compiled_reference` | the same under `torch.compile` (inductor, static shapes) |
| `eager_anchor` | spec §5's plain eager formulation: `torch.topk` + `embedding_bag`, input dtype |
| `compiled_anchor` | the same under `torch.compile` |
| `torch_mm` | `x @ W_enc` alone (op `encoder_gemm`): the GEMM the fused ops are held to |
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops, reference  # ops also registers torch.ops.safedig
from .shapes import GEMM_OP, Shape

# Every token is steered (tau < 0 and h >= 0): the decode reads all k rows, the worst case.
BETA, GAMMA, TAU = 0.5, 1.0, -1.0
HARMFUL_FRACTION = 0.05
CUDAGRAPH_MAX_N = 64  # launch overhead only matters at latency sizes
# The low-precision yardstick of each op's tolerance: the reference in the input dtype; for
# the bare GEMM, the input-dtype GEMM itself.
LOWP_PROVIDER = {GEMM_OP: "torch_mm"}

OUTPUT_NAMES = {
    "steer": ("y", "h"),
    "topk_encode": ("vals", "idx"),
    "sparse_decode": ("x_hat",),
    GEMM_OP: ("pre",),
}


@dataclass
class Inputs:
    """x `[N, d]`; W_enc `[d, F]`, b_enc `[F]`, W_dec `[F, d]`, b_dec `[d]` in one dtype;
    harmful bool `[F]`; beta, gamma, tau 0-d fp32; enc_bias fp32 `[F]` (as TopKSAE caches it)."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    harmful: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    tau: torch.Tensor
    k: int

    def cast(self, dtype: torch.dtype) -> "Inputs":
        c = {n: getattr(self, n).to(dtype) for n in ("x", "W_enc", "b_enc", "W_dec", "b_dec")}
        return Inputs(**c, harmful=self.harmful, beta=self.beta, gamma=self.gamma, tau=self.tau, k=self.k)

    def steer_args(self) -> tuple:
        return (self.x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.harmful, self.beta, self.gamma,
                self.tau, self.k)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Seeded random SAE and activations, drawn on `device` in fp32, then cast."""
    g = torch.Generator(device=device).manual_seed(seed)
    N, d, Fdim = shape.N, shape.d, shape.F

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    W_enc = randn(d, Fdim).div_(d ** 0.5).to(dtype)
    b_enc = randn(Fdim).mul_(0.01).to(dtype)
    W_dec = F.normalize(randn(Fdim, d), dim=1).to(dtype)
    b_dec = randn(d).mul_(0.01).to(dtype)
    x = randn(N, d).to(dtype)
    harmful = torch.rand(Fdim, generator=g, device=device) < HARMFUL_FRACTION
    scalars = [torch.tensor(v, dtype=torch.float32, device=device) for v in (BETA, GAMMA, TAU)]
    return Inputs(x, W_enc, b_enc, W_dec, b_dec, harmful, *scalars, k=shape.k)


def input_settings(seed: int) -> dict:
    """What the inputs were, for the report: strengths, harmful fraction, seed."""
    return {"beta": BETA, "gamma": GAMMA, "tau": TAU, "harmful_fraction": HARMFUL_FRACTION, "seed": seed,
            "activations": "N(0, 1)", "W_enc": "N(0, 1/d)", "W_dec": "unit-norm random rows"}


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 inputs (the simplified spec §3 oracle), fp64 for fp32 inputs."""
    return torch.float64 if dtype == torch.float32 else torch.float32


class Prepared:
    """One shape's inputs, plus its oracle and low-precision-reference outputs, computed once
    and shared by every provider of every op at that shape."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.inputs = make_inputs(shape, dtype, device, seed)
        self._cache: dict[str, object] = {}

    def memo(self, key: str, build: Callable[[], object]):
        """`build()` once per shape (the check's tie structure, for instance)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @functools.cached_property
    def hi(self) -> Inputs:
        return self.inputs.cast(oracle_dtype(self.dtype))

    @functools.cached_property
    def enc_bias(self) -> torch.Tensor:
        i = self.inputs
        return ops.encoder_bias(i.W_enc, i.b_enc, i.b_dec)

    @functools.cached_property
    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The oracle's TopK codes as the ops take them (vals fp32, idx int32 `[N, k]`):
        sparse_decode's input, so every decode provider decodes the same codes."""
        o = self.oracle("topk_encode")
        return o["vals"].float(), o["idx"]

    @functools.cached_property
    def pre_hi(self) -> torch.Tensor:
        """Pre-activations `[N, F]` in the oracle dtype (scores any provider's chosen indices)."""
        h = self.hi
        return reference.encoder_preactivations(h.x, h.W_enc, h.b_enc, h.b_dec)

    def oracle(self, op: str) -> dict[str, torch.Tensor]:
        """Outputs computed in the oracle dtype from the same inputs."""
        key = "oracle:" + op
        if key not in self._cache:
            h = self.hi
            if op == "steer":
                out = reference.steer(*h.steer_args())
            elif op == "topk_encode":
                out = reference.topk_encode(h.x, h.W_enc, h.b_enc, h.b_dec, h.k)
            elif op == "sparse_decode":
                vals, idx = self.codes
                out = (reference.sparse_decode(vals.to(h.W_dec.dtype), idx, h.W_dec, h.b_dec),)
            elif op == GEMM_OP:
                out = (h.x @ h.W_enc,)
            else:
                raise ValueError(f"unknown op {op!r}")
            self._cache[key] = as_outputs(op, out)
        return self._cache[key]

    def lowp(self, op: str) -> dict[str, torch.Tensor]:
        """The reference computed in the input dtype, as plain eager PyTorch would: its error
        against the oracle is the yardstick of every provider's tolerance (spec §3)."""
        key = "lowp:" + op
        if key not in self._cache:
            self._cache[key] = as_outputs(op, BUILDERS[(op, LOWP_PROVIDER.get(op, "eager_reference"))](self)())
        return self._cache[key]


def as_outputs(op: str, result) -> dict[str, torch.Tensor]:
    """A provider's return value as {output name: tensor} (an anchor returns y alone)."""
    names = OUTPUT_NAMES[op]
    if isinstance(result, torch.Tensor):
        result = (result,)
    if not isinstance(result, (tuple, list)) or not 1 <= len(result) <= len(names):
        raise TypeError(f"{op} provider returned {type(result).__name__}; expected up to {len(names)} tensors {names}")
    return dict(zip(names, result))


# -- baselines -----------------------------------------------------------------------------

def steer_anchor(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, k: int) -> torch.Tensor:
    """spec §5's plain eager steering, `x` `[N, d]` -> y `[N, d]`, all in x's dtype: one GEMM,
    `torch.topk` (ties in any order), two `embedding_bag` decodes. No gate: the benchmarks
    steer every token, where the gate is a no-op. The fastest obvious eager formulation."""
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = torch.topk(pre, k, dim=-1)
    vals = torch.relu(vals)
    harm = harmful[idx]
    safe_w = torch.where(harm, torch.zeros_like(vals), vals)
    x_hat_safe = F.embedding_bag(idx, W_dec, per_sample_weights=safe_w, mode="sum") + b_dec
    r = F.embedding_bag(idx, W_dec, per_sample_weights=vals - safe_w, mode="sum")
    return x + beta * (x_hat_safe - x) - gamma * r


def topk_encode_anchor(x, W_enc, b_enc, b_dec, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain eager TopK encode in x's dtype: vals fp32 `[N, k]`, idx int32 `[N, k]`."""
    vals, idx = torch.topk((x - b_dec) @ W_enc + b_enc, k, dim=-1)
    return torch.relu(vals).float(), idx.int()


def _steer_ref(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k: int):
    return reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, upcast=False)


def _topk_ref(x, W_enc, b_enc, b_dec, k: int):
    return reference.topk_encode(x, W_enc, b_enc, b_dec, k, upcast=False)


def _decode_ref(vals, idx, W_dec, b_dec):
    return reference.sparse_decode(vals, idx, W_dec, b_dec, upcast=False)


def _compile(fn: Callable) -> Callable:
    # A fresh dynamo state per row: no recompile-limit fallback to eager after many shapes,
    # and static shapes, as a pipeline at one resolution would compile them.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# -- builders: prepared shape -> zero-argument timed call ----------------------------------

def _steer(compiled: bool, fn: Callable) -> Callable[[Prepared], Callable[[], object]]:
    def build(p: Prepared):
        f = _compile(fn) if compiled else fn
        i = p.inputs
        if fn is steer_anchor:
            args = (i.x, i.W_enc, i.b_enc, i.W_dec, i.b_dec, i.harmful, i.beta, i.gamma, i.k)
        else:
            args = i.steer_args()
        return lambda: f(*args)
    return build


def _topk(compiled: bool, fn: Callable) -> Callable[[Prepared], Callable[[], object]]:
    def build(p: Prepared):
        f = _compile(fn) if compiled else fn
        i = p.inputs
        return lambda: f(i.x, i.W_enc, i.b_enc, i.b_dec, i.k)
    return build


def _decode(compiled: bool) -> Callable[[Prepared], Callable[[], object]]:
    def build(p: Prepared):
        f = _compile(_decode_ref) if compiled else _decode_ref
        vals, idx = p.codes
        return lambda: f(vals, idx, p.inputs.W_dec, p.inputs.b_dec)
    return build


def _fused_steer(p: Prepared):
    i, bias = p.inputs, p.enc_bias
    call = ops.call_steer  # what sk.steer and TopKSAE.steer run eagerly: the op without the dispatcher
    return lambda: call(*i.steer_args(), bias)


def _fused_steer_cudagraph(p: Prepared):
    if p.device.type != "cuda":
        raise RuntimeError("fused_cudagraph needs a CUDA device")
    i, bias = p.inputs, p.enc_bias
    args = (i.x.clone(), *i.steer_args()[1:], bias)
    op = torch.ops.safedig.steer
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels and warm the allocator outside capture
        for _ in range(3):
            op(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*args)

    def replay():
        graph.replay()
        return out
    return replay


def _fused_topk(p: Prepared):
    i, bias = p.inputs, p.enc_bias
    op = torch.ops.safedig.topk_encode
    return lambda: op(i.x, i.W_enc, i.b_enc, i.b_dec, i.k, bias)


def _fused_decode(p: Prepared):
    vals, idx = p.codes
    op = torch.ops.safedig.sparse_decode
    return lambda: op(vals, idx, p.inputs.W_dec, p.inputs.b_dec)


def _gemm(p: Prepared):
    x, W = p.inputs.x, p.inputs.W_enc
    return lambda: torch.mm(x, W)


BUILDERS: dict[tuple[str, str], Callable[[Prepared], Callable[[], object]]] = {
    ("steer", "fused"): _fused_steer,
    ("steer", "fused_cudagraph"): _fused_steer_cudagraph,
    ("steer", "eager_reference"): _steer(False, _steer_ref),
    ("steer", "compiled_reference"): _steer(True, _steer_ref),
    ("steer", "eager_anchor"): _steer(False, steer_anchor),
    ("steer", "compiled_anchor"): _steer(True, steer_anchor),
    ("topk_encode", "fused"): _fused_topk,
    ("topk_encode", "eager_reference"): _topk(False, _topk_ref),
    ("topk_encode", "compiled_reference"): _topk(True, _topk_ref),
    ("topk_encode", "eager_anchor"): _topk(False, topk_encode_anchor),
    ("topk_encode", "compiled_anchor"): _topk(True, topk_encode_anchor),
    ("sparse_decode", "fused"): _fused_decode,
    ("sparse_decode", "eager_reference"): _decode(False),
    ("sparse_decode", "compiled_reference"): _decode(True),
    (GEMM_OP, "torch_mm"): _gemm,
}

# kind: what a provider is compared as. Speedups are against the fastest row of each
# baseline kind at the same shape, so a ratio never flatters the fused op.
KINDS = {
    "fused": "fused", "fused_cudagraph": "fused",
    "eager_reference": "eager", "eager_anchor": "eager",
    "compiled_reference": "compiled", "compiled_anchor": "compiled",
    "torch_mm": "floor",
}


def providers_for(op: str, shape: Shape, device: torch.device, compile_: tuple[str, ...]) -> list[str]:
    """Provider names measured for `op` at `shape`, eager reference first (its error sets the
    other rows' tolerance)."""
    if op == GEMM_OP:
        return ["torch_mm"]
    names = ["eager_reference"]
    if (op, "eager_anchor") in BUILDERS:
        names.append("eager_anchor")
    for base in ("reference", "anchor"):
        if base in compile_ and (op, f"compiled_{base}") in BUILDERS:
            names.append(f"compiled_{base}")
    names.append("fused")
    if op == "steer" and device.type == "cuda" and shape.N <= CUDAGRAPH_MAX_N:
        names.append("fused_cudagraph")
    return names


def flops_bytes(op: str, shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """Useful FLOPs and the bytes a perfect kernel must move (read + write) for one call.

    Weights and activations are read once, outputs written once; only the decoder rows the
    codes select can be read (min(F, N*k) of them), so at N = 16 the floor is not charged for
    a whole W_dec the op never touches. Codes are fp32 values + int32 indices.
    """
    N, d, Fdim, k = shape.N, shape.d, shape.F, shape.k
    e = torch.finfo(dtype).bits // 8
    rows = min(Fdim, N * k)
    codes = N * k * 8
    if op == GEMM_OP:
        return 2 * N * d * Fdim, e * (N * d + d * Fdim + N * Fdim)
    if op == "topk_encode":
        return 2 * N * d * Fdim, e * (N * d + d * Fdim + Fdim + d) + codes
    if op == "sparse_decode":
        return 2 * N * k * d, codes + e * (rows * d + d + N * d)
    if op == "steer":
        return 2 * N * d * Fdim + 2 * N * k * d, e * (2 * N * d + d * Fdim + rows * d + Fdim + d) + 4 * N + Fdim
    raise ValueError(f"unknown op {op!r}")


def gemm_flops(op: str, shape: Shape) -> int:
    """FLOPs that can run at the GEMM ceiling (the encoder GEMM; a decode is a gather)."""
    return 0 if op == "sparse_decode" else 2 * shape.N * shape.d * shape.F
