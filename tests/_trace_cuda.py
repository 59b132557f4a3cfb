"""Trace each op's CUDA path (forward and backward ops) on the CPU with fake CUDA tensors and
print, per case, the graph's Triton kernels as JSON lines.

AOTAutograd (the front half of inductor, and of torch.export + AOTInductor) decomposes a
`torch.library.triton_op` into its body, so the graph should hold the encoder GEMM and one
`triton_kernel_wrapper_functional` node per launch, and no opaque `safedig` op. Fake tensors
need no GPU; Triton's mutation analysis needs a driver, and without one it assumes every
argument may be written (a warning on stderr), which changes no node this checks.

Run in a fresh process without TRITON_INTERPRET (the interpreter's kernels cannot be wrapped):
    python tests/_trace_cuda.py        (run by tests/ops/test_traceable.py)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._functorch.aot_autograd import aot_export_module  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import safedig_kernels  # noqa: E402, F401  (registers the ops)
from safedig_kernels.ops._launch import ONE_LAUNCH_MAX_ROWS, ROW_ALGO_MAX_ROWS  # noqa: E402

d, F, k = 64, 256, 8


class Steer(torch.nn.Module):
    def forward(self, x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau):
        return tuple(torch.ops.safedig.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, k, None))


class EncodeDecode(torch.nn.Module):
    def forward(self, x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau):
        vals, idx = torch.ops.safedig.topk_encode(x, W_enc, b_enc, b_dec, k, None)
        return vals, idx, torch.ops.safedig.sparse_decode(vals, idx, W_dec, b_dec)


def trace(module: torch.nn.Module, rows: int, dtype: torch.dtype, per_sample: bool) -> dict:
    with FakeTensorMode():
        def cuda(*shape, dt=dtype):
            return torch.empty(shape, device="cuda", dtype=dt)
        x = cuda(2, rows // 2, d) if rows % 2 == 0 else cuda(rows, d)
        beta = cuda(x.shape[0], dt=torch.float32) if per_sample else cuda(dt=torch.float32)
        args = (x, cuda(d, F), cuda(F), cuda(F, d), cuda(d), cuda(F, dt=torch.bool), beta,
                cuda(dt=torch.float32), cuda(dt=torch.float32))
        gm, _ = aot_export_module(module, args, trace_joint=False)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
               for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return {"op": type(module).__name__, "rows": rows, "dtype": str(dtype), "per_sample": per_sample,
            "kernels": kernels, "gemms": sum(t.startswith(("aten.mm", "aten.addmm")) for t in targets),
            "opaque": [t for t in targets if "safedig" in t]}


class Backward(torch.nn.Module):
    """The three backward ops, as the ops' autograd formulas call them."""

    def forward(self, x, W_enc, b_enc, W_dec, b_dec, harmful, beta, gamma, tau, grad_y, grad_h, h, vals, idx,
                grad_vals):
        steer = torch.ops.safedig.steer_backward(grad_y, grad_h, x, W_enc, W_dec, b_dec, harmful, beta, gamma, tau, h,
                                                 vals, idx, True, True)
        encode = torch.ops.safedig.topk_encode_backward(grad_vals, x, W_enc, b_dec, vals, idx, True, True)
        decode = torch.ops.safedig.sparse_decode_backward(grad_y, vals, idx, W_dec, True, True)
        return steer + encode + decode


def trace_backward(rows: int, dtype: torch.dtype) -> dict:
    with FakeTensorMode():
        def cuda(*shape, dt=dtype):
            return torch.empty(shape, device="cuda", dtype=dt)
        x = cuda(2, rows // 2, d) if rows % 2 == 0 else cuda(rows, d)
        lead = x.shape[:-1]
        args = (x, cuda(d, F), cuda(F), cuda(F, d), cuda(d), cuda(F, dt=torch.bool), cuda(x.shape[0], dt=torch.float32),
                cuda(dt=torch.float32), cuda(dt=torch.float32), cuda(*x.shape), cuda(*lead, dt=torch.float32),
                cuda(*lead, dt=torch.float32), cuda(*lead, k, dt=torch.float32), cuda(*lead, k, dt=torch.int32),
                cuda(*lead, k, dt=torch.float32))
        gm, _ = aot_export_module(Backward(), args, trace_joint=False)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
               for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return {"op": "Backward", "rows": rows, "dtype": str(dtype), "kernels": kernels,
            "sorts": sum(t.startswith("aten.sort") for t in targets), "opaque": [t for t in targets if "safedig" in t]}


def symbolic_guards(rows: int) -> dict:
    """Run the CUDA launch path on fake tensors whose row count is a symbol (what
    torch.compile(dynamic=True) traces) and list the guards it put on that symbol: a guard
    that pins N, or one at a path threshold, would recompile for another N."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from safedig_kernels.ops.sparse_decode import _sparse_decode_bwd, _sparse_decode_fwd
    from safedig_kernels.ops.steer import _steer_body, _steer_bwd
    from safedig_kernels.ops.topk_encode import _topk_encode_bwd, _topk_encode_fwd

    shape_env = ShapeEnv()
    symbol = shape_env.create_symbol(rows, source=ConstantSource("N"), dynamic_dim=DimDynamic.DYNAMIC)
    N = shape_env.create_symintnode(symbol, hint=rows)
    with FakeTensorMode(shape_env=shape_env):
        def cuda(*shape, dt=torch.bfloat16):
            return torch.empty(shape, device="cuda", dtype=dt)
        x, W_enc, b_enc, W_dec, b_dec = cuda(N, d), cuda(d, F), cuda(F), cuda(F, d), cuda(d)
        y, h = _steer_body(x, W_enc, b_enc, W_dec, b_dec, cuda(F, dt=torch.bool), cuda(N, dt=torch.float32),
                           cuda(dt=torch.float32), cuda(dt=torch.float32), k, None)
        vals, idx = _topk_encode_fwd(x, W_enc, cuda(F, dt=torch.float32), k)
        _sparse_decode_fwd(vals, idx, W_dec, b_dec)
        # the backward launchers, every gradient asked
        harmful, strengths = cuda(F, dt=torch.bool), [cuda(dt=torch.float32) for _ in range(3)]
        dx, *_ = _steer_bwd(cuda(N, d), cuda(N, dt=torch.float32), x, W_enc, W_dec, b_dec, harmful, *strengths, h, vals,
                            idx)
        _topk_encode_bwd(vals, x, W_enc, b_dec, vals, idx)
        _sparse_decode_bwd(cuda(N, d), vals, idx, W_dec)
    return {"op": "symbolic", "rows": rows, "guards": [str(g.expr) for g in shape_env.guards],
            "symbol": str(symbol), "y_shape": str(tuple(y.shape)), "dx_shape": str(tuple(dx.shape))}


def main() -> None:
    for rows in (5, ONE_LAUNCH_MAX_ROWS + 1, ROW_ALGO_MAX_ROWS + 4):  # one launch, row, split (launch table)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            print(json.dumps(trace(Steer(), rows, dtype, per_sample=rows % 2 == 0)), flush=True)
    print(json.dumps(trace(EncodeDecode(), ROW_ALGO_MAX_ROWS + 4, torch.bfloat16, per_sample=False)), flush=True)
    for rows, dtype in ((5, torch.bfloat16), (ROW_ALGO_MAX_ROWS + 4, torch.float16), (64, torch.float32)):
        print(json.dumps(trace_backward(rows, dtype)), flush=True)
    for rows in (5, ONE_LAUNCH_MAX_ROWS + 1, 4096):  # a symbol's hint on each side of the thresholds
        print(json.dumps(symbolic_guards(rows)), flush=True)


if __name__ == "__main__":
    main()
