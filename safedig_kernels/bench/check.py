"""The correctness gate: a provider's output is checked against the oracle before it is timed,
and a row that fails is refused (never timed, never reported).

Spec §3, simplified for whole benchmark shapes, with the tolerances of `safedig_kernels.testing`
(the tests' own). The oracle is the reference computed in fp32 (fp64 for fp32 inputs) from the
same inputs; the yardstick is the eager reference in the input dtype (what plain PyTorch costs
at that precision). Per token t and output (`testing.tolerance`):

    err_t(out) <= min(2 * max_t err_t(eager reference) + EPS[dtype], CAP[dtype])

Near ties are not errors (spec §3): features whose oracle pre-activation lies within
`TIE_RTOL[dtype] * max|pre_t|` of the token's k-th largest may be chosen either way by a
correct implementation. So for `y` the error is measured after projecting out the decoder
rows of those features (any mix of them is a legitimate selection), for `h` after allowing
the harmful ones' values, and a provider that returns indices is scored against the oracle at
its own indices, which must form a top-k up to the tie window. Decode and GEMM outputs have no
selection and are compared directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .._io import dtype_name
from ..testing import CAP, EPS, TIE_RTOL, tolerance
from .providers import Prepared
from .shapes import GEMM_OP

MAX_NEAR_TIES = 512  # per token; more than this and the shape cannot be checked this way
_CHUNK_ELEMS = 1 << 25  # fp64 elements per batched projection (~256 MB)


class Refused(Exception):
    """A row that may not be timed or reported; the message says which and why."""

    def __init__(self, case_id: str, reason: str):
        super().__init__(f"{case_id}: {reason}")
        self.case_id = case_id
        self.reason = reason


@dataclass
class OutputCheck:
    name: str
    err: float        # max over tokens of the provider's error
    bound: float
    reference_err: float  # the same for the eager reference in the input dtype

    @property
    def passed(self) -> bool:
        return self.err <= self.bound  # False for NaN

    def to_dict(self) -> dict:
        return {"max_token_err": self.err, "bound": self.bound, "reference_max_token_err": self.reference_err}


@dataclass
class CheckResult:
    passed: bool
    oracle: str
    outputs: list[OutputCheck] = field(default_factory=list)
    reason: str = ""
    near_tie_tokens: float = 0.0  # fraction of tokens with a near tie at the top-k boundary

    def to_dict(self) -> dict:
        return {"passed": self.passed, "oracle": self.oracle, "reason": self.reason,
                "near_tie_tokens": self.near_tie_tokens, "outputs": {o.name: o.to_dict() for o in self.outputs}}


@dataclass
class Ties:
    """Per token: the oracle's k-th largest pre-activation `kth` `[N]`, the tie window `tol`
    `[N]`, and the features inside it: `near` `[N, M]` ids with `mask` `[N, M]`."""

    kth: torch.Tensor
    tol: torch.Tensor
    near: torch.Tensor
    mask: torch.Tensor


def ties(prep: Prepared) -> Ties:
    def build() -> Ties:
        pre = prep.pre_hi
        k = prep.shape.k
        kth = pre.topk(k, dim=-1).values[:, -1]
        tol = TIE_RTOL[prep.dtype] * pre.abs().amax(-1) + 1e-30
        dist = (pre - kth[:, None]).abs()
        inside = dist <= tol[:, None]
        # The k-th feature is always inside its own window; a tie needs a second one.
        inside &= inside.sum(-1, keepdim=True) > 1
        M = int(inside.sum(-1).max()) if pre.shape[0] else 0
        if M > MAX_NEAR_TIES:
            raise ValueError(f"a token has {M} features within the tie window of its k-th pre-activation "
                             f"(> {MAX_NEAR_TIES}): this shape cannot be checked")
        near = dist.topk(M, dim=-1, largest=False).indices if M else dist.new_zeros(pre.shape[0], 0, dtype=torch.long)
        return Ties(kth, tol, near, inside.gather(-1, near))
    return prep.memo("ties", build)


def _token_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.double().reshape(-1, t.shape[-1]), dim=-1)


def _relative(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per token, rows with den ~ 0 scaled by the RMS row norm instead."""
    floor = 1e-6 * den.square().mean().sqrt().clamp_min(1e-30) if den.numel() else den.new_tensor(1.0)
    return num / torch.maximum(den, floor)


def _max(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    v = t.max().item()
    return float("inf") if v != v else v


def projected_residual(prep: Prepared, diff: torch.Tensor) -> torch.Tensor:
    """Per-token norm of `diff` `[N, d]` after removing its component in the span of the
    decoder rows of that token's near-tie features (a legitimate selection differs from the
    oracle's by a mix of those rows only)."""
    t = ties(prep)
    diff = diff.double()
    N, d = diff.shape
    M = t.near.shape[1]
    if M == 0:
        return torch.linalg.vector_norm(diff, dim=-1)
    W = prep.hi.W_dec
    out = torch.empty(N, dtype=torch.float64, device=diff.device)
    step = max(1, _CHUNK_ELEMS // (M * d))
    for s in range(0, N, step):
        e = min(N, s + step)
        m = t.mask[s:e]
        A = W[t.near[s:e]].double() * m[..., None]                   # [n, M, d]
        G = A @ A.transpose(1, 2) + torch.diag_embed((~m).double())  # padded slots solve to 0
        c = torch.linalg.solve(G, A @ diff[s:e, :, None])            # [n, M, 1]
        out[s:e] = torch.linalg.vector_norm(diff[s:e] - (A.transpose(1, 2) @ c)[..., 0], dim=-1)
    return out


def _y_err(prep: Prepared, y: torch.Tensor, y_o: torch.Tensor) -> torch.Tensor:
    d = y_o.shape[-1]
    return _relative(projected_residual(prep, y.reshape(-1, d).double() - y_o.reshape(-1, d).double()),
                     _token_norm(y_o))


def _h_err(prep: Prepared, h: torch.Tensor, h_o: torch.Tensor) -> torch.Tensor:
    t = ties(prep)
    pre = prep.pre_hi
    harmful_near = prep.inputs.harmful[t.near] & t.mask
    allowance = (pre.gather(-1, t.near).clamp_min(0) * harmful_near).sum(-1).double()
    excess = ((h.double() - h_o.double()).abs().reshape(-1) - allowance).clamp_min(0)
    scale = t.kth.double().abs().mean() if t.kth.numel() else torch.ones((), dtype=torch.float64)
    return excess / (h_o.double().abs().reshape(-1) + scale)


def _direct_err(out: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    n = want.shape[-1]
    diff = out.double().reshape(-1, n) - want.double().reshape(-1, n)
    return _relative(torch.linalg.vector_norm(diff, dim=-1), _token_norm(want))


def _codes_err(prep: Prepared, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-token error of `vals` against the oracle pre-activations at the provider's own
    indices (ReLU'd), so a legitimate near-tie choice costs nothing."""
    own = prep.pre_hi.gather(-1, idx.long()).clamp_min(0)
    return _direct_err(vals, own)


def _invalid_topk(prep: Prepared, vals: torch.Tensor, idx: torch.Tensor) -> Optional[str]:
    F = prep.shape.F
    if idx.numel() == 0:
        return None
    if int(idx.min()) < 0 or int(idx.max()) >= F:
        return f"idx: outside [0, {F})"
    if idx.shape[-1] > 1 and bool((idx.sort(-1).values.diff(dim=-1) == 0).any()):
        return "idx: a feature chosen twice for one token"
    t = ties(prep)
    chosen = prep.pre_hi.gather(-1, idx.long())
    short = chosen < (t.kth - t.tol)[:, None]
    if bool(short.any()):
        n = int(short.any(-1).sum())
        return f"idx: {n} tokens chose a feature below the k-th largest by more than the tie window"
    if vals.shape[-1] > 1 and bool((vals.diff(dim=-1) > t.tol[:, None].to(vals.dtype)).any()):
        return "vals: not in descending order"
    return None


def _expected_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return {"h": torch.float32, "vals": torch.float32, "idx": torch.int32}.get(name, dtype)


def _errors(op: str, outputs: dict[str, torch.Tensor], prep: Prepared) -> dict[str, torch.Tensor]:
    """Per-token error of each output of `op` (keys: output names, 'vals@idx' for codes)."""
    o = prep.oracle(op)
    errs = {}
    if op == "steer":
        errs["y"] = _y_err(prep, outputs["y"], o["y"])
        if "h" in outputs:
            errs["h"] = _h_err(prep, outputs["h"], o["h"])
    elif op == "topk_encode":
        errs["vals@idx"] = _codes_err(prep, outputs["vals"], outputs["idx"])
    elif op in ("sparse_decode", GEMM_OP):
        name = "x_hat" if op == "sparse_decode" else "pre"
        errs[name] = _direct_err(outputs[name], o[name])
    else:
        raise ValueError(f"unknown op {op!r}")
    return errs


def check_outputs(op: str, outputs: dict[str, torch.Tensor], prep: Prepared) -> CheckResult:
    """Score `outputs` of `op` at the prepared shape. A wrong output never raises: the result
    says what failed."""
    oracle, low = prep.oracle(op), prep.lowp(op)
    dt = prep.dtype
    t = ties(prep) if op in ("steer", "topk_encode") else None
    res = CheckResult(passed=True, oracle=f"reference in {dtype_name(prep.hi.x.dtype)}",
                      near_tie_tokens=(float(t.mask.any(-1).double().mean())
                                       if t is not None and t.mask.numel() else 0.0))

    def fail(reason: str) -> CheckResult:
        res.passed, res.reason = False, reason
        return res

    required = {"steer": ("y",), "topk_encode": ("vals", "idx")}.get(op, tuple(oracle))
    missing = [n for n in required if n not in outputs]
    if missing:
        return fail(f"missing outputs {missing}; got {sorted(outputs)}")
    for name, out in outputs.items():
        want = oracle[name]
        if not isinstance(out, torch.Tensor):
            return fail(f"{name}: not a tensor ({type(out).__name__})")
        if tuple(out.shape) != tuple(want.shape):
            return fail(f"{name}: shape {tuple(out.shape)}, expected {tuple(want.shape)}")
        if out.dtype != _expected_dtype(name, dt):
            return fail(f"{name}: dtype {out.dtype}, expected {_expected_dtype(name, dt)}")
        if out.device.type != prep.device.type:
            return fail(f"{name}: on {out.device}, expected {prep.device.type}")
        if name != "idx" and bool((~torch.isfinite(out) & torch.isfinite(want)).any()):
            return fail(f"{name}: NaN or Inf where the oracle is finite")
    if op == "topk_encode":
        why = _invalid_topk(prep, outputs["vals"], outputs["idx"])
        if why:
            return fail(why)
    errs = _errors(op, outputs, prep)
    ref_errs = prep.memo("reference_errors:" + op, lambda: _errors(op, low, prep))
    for name, e in errs.items():
        ref = _max(ref_errs[name])
        c = OutputCheck(name, _max(e), tolerance(ref, dt), ref)
        res.outputs.append(c)
        if not c.passed:
            n_bad = int((e > c.bound).sum()) if e.numel() else 0
            return fail(f"{name}: {n_bad} of {e.numel()} tokens off by up to {c.err:.3g} (relative) "
                        f"> bound {c.bound:.3g} (2 x the eager reference's {ref:.3g} + {EPS[dt]:.3g}, "
                        f"capped at {CAP[dt]:g})")
    return res
