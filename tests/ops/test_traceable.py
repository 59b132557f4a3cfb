"""The ops' CUDA path is visible to the compiler: traced on the CPU with fake CUDA tensors
(tests/_trace_cuda.py), each op decomposes into the encoder GEMM and its Triton kernels, the
same kernels per row count as the launch table in test_launch.py, and each backward op into its
kernels, with no opaque op left for inductor or AOTInductor to call back into Python. On a GPU,
test_kernels_gpu.py compiles and exports a steered block for real."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
HERE = Path(__file__).resolve().parents[1]  # tests/, where _trace_cuda.py lives

SPLIT = ["_group_max_kernel", "_split_bound_kernel", "_split_candidates_kernel", "_split_rank_kernel"]
EXPECTED = {  # (op, rows) -> kernels in launch order
    ("Steer", 5): ["_steer_row_kernel"],
    ("Steer", 65): ["_topk_select_kernel", "_steer_fwd_kernel"],
    ("Steer", 260): SPLIT + ["_steer_fwd_kernel"],
    ("EncodeDecode", 260): SPLIT + ["_sparse_decode_kernel"],
}
# steer_backward, topk_encode_backward, sparse_decode_backward, every gradient asked: the same at any N
BACKWARD = (["_steer_bwd_codes_kernel", "_encoder_bwd_kernel", "_feature_rows_kernel", "_feature_rows_kernel"]
            + ["_encoder_bwd_kernel", "_feature_rows_kernel"] + ["_sparse_decode_bwd_kernel", "_feature_rows_kernel"])


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SAFEDIG_DISABLE_TRITON")}
    p = subprocess.run([sys.executable, str(HERE / "_trace_cuda.py")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def test_every_case_was_traced(traced):
    static = [r for r in traced if r["op"] not in ("symbolic", "Backward")]
    assert {(r["op"], r["rows"]) for r in static} == set(EXPECTED)
    assert len(static) == 10  # 3 row counts x 3 dtypes for steer, and encode + decode
    assert sorted((r["rows"], r["dtype"]) for r in traced if r["op"] == "Backward") == [
        (5, "torch.bfloat16"), (64, "torch.float32"), (260, "torch.float16")]
    assert [r["rows"] for r in traced if r["op"] == "symbolic"] == [5, 65, 4096]


def test_a_symbolic_row_count_is_never_pinned(traced):
    """torch.compile(dynamic=True) traces the bodies with a symbolic N: the launchers must not
    specialise it or compare it with a path threshold (64, 256 rows), or each new N would
    recompile. The one guard left bounds the pre-activation buffer (PRE_BUFFER_BYTES)."""
    for r in (r for r in traced if r["op"] == "symbolic"):
        n = r["symbol"]
        assert r["y_shape"] == r["dx_shape"] == f"({n}, 64)", r  # the backward launchers too
        assert all(g == f"{n} <= 2097152" for g in r["guards"]), r


def test_backward_decomposes_into_triton_kernels(traced):
    """Each backward op's CUDA path: its Triton kernels and one sort of the codes by feature (the
    weight gradients' pairs), no opaque op."""
    for r in (r for r in traced if r["op"] == "Backward"):
        assert r["opaque"] == [], r
        assert r["kernels"] == BACKWARD, r
        assert r["sorts"] == 3, r


def test_cuda_path_decomposes_into_gemm_and_triton_kernels(traced):
    for r in (r for r in traced if r["op"] not in ("symbolic", "Backward")):
        assert r["opaque"] == [], r
        assert r["kernels"] == EXPECTED[(r["op"], r["rows"])], r
        assert r["gemms"] == 2, r  # the encoder GEMM, and the GEMV that folds b_dec into its bias
