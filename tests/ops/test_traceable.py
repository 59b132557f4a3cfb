"""The ops' CUDA path is visible to the compiler: traced on the CPU with fake CUDA tensors
(tests/_trace_cuda.py), each op decomposes into the encoder GEMM and its Triton kernels, the
same kernels per row count as the launch table in test_launch.py, with no opaque op left for
inductor or AOTInductor to call back into Python. On a GPU, test_kernels_gpu.py compiles and
exports a steered block for real."""
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


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SAFEDIG_DISABLE_TRITON")}
    p = subprocess.run([sys.executable, str(HERE / "_trace_cuda.py")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def test_every_case_was_traced(traced):
    assert {(r["op"], r["rows"]) for r in traced} == set(EXPECTED)
    assert len(traced) == 10  # 3 row counts x 3 dtypes for steer, and encode + decode


def test_cuda_path_decomposes_into_gemm_and_triton_kernels(traced):
    for r in traced:
        assert r["opaque"] == [], r
        assert r["kernels"] == EXPECTED[(r["op"], r["rows"])], r
        assert r["gemms"] == 2, r  # the encoder GEMM, and the GEMV that folds b_dec into its bias
