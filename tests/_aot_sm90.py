"""Compile the kernels for sm_90 without a GPU and print their resource use as JSON lines.

Run in a fresh process without TRITON_INTERPRET (under the interpreter `@triton.jit` yields
objects the compiler cannot take). Used by test_kernels_compile.py; also handy by hand:
    python tests/_aot_sm90.py   (run by tests/ops/test_kernels_compile.py)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from safedig_kernels.ops._launch import LaunchConfig, backward_config, decode_config, select_config  # noqa: E402
from safedig_kernels.ops.sparse_decode import (  # noqa: E402
    _feature_rows_kernel,
    _sparse_decode_bwd_kernel,
    _sparse_decode_kernel,
)
from safedig_kernels.ops.steer import _steer_bwd_codes_kernel, _steer_fwd_kernel, _steer_row_kernel  # noqa: E402
from safedig_kernels.ops.topk_encode import (  # noqa: E402
    _encoder_bwd_kernel,
    _group_max_kernel,
    _split_bound_kernel,
    _split_candidates_kernel,
    _split_rank_kernel,
    _topk_select_kernel,
)

TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

SELECT = [(12288, 32, torch.bfloat16, None, None), (49152, 64, torch.bfloat16, None, None),
          (9728, 32, torch.float32, None, None), (131072, 256, torch.bfloat16, None, None),
          (100, 7, torch.float32, None, None),
          (12288, 32, torch.bfloat16, 2048, 4),
          # the 1- and 2-warp settings gpu_check sweeps
          (12288, 32, torch.bfloat16, 512, 1), (12288, 32, torch.bfloat16, 1024, 1),
          (12288, 32, torch.bfloat16, 1024, 2),
          (12288, 32, torch.bfloat16, 2048, 2),
          # "row" with pipelined chunk loads (sixth field: load_stages; the split kernels have no such loop)
          (12288, 32, torch.bfloat16, 1024, 4, 3), (12288, 32, torch.bfloat16, 512, 1, 3)]
DECODE = [(3072, 32, torch.bfloat16), (2432, 64, torch.float16), (1000, 256, torch.float32)]
# the one-launch small-N steer kernel: (d, F, k, dtype)
ONE_LAUNCH = [(3072, 12288, 32, torch.bfloat16), (3072, 49152, 64, torch.bfloat16), (2432, 9728, 32, torch.float16),
              (1000, 300, 7, torch.float32)]
# the backward kernels at the default backward_config: (d, k, dtype)
BACKWARD = [(3072, 32, torch.bfloat16), (3072, 64, torch.bfloat16), (2432, 32, torch.float16), (1000, 7, torch.float32),
            (4096, 256, torch.bfloat16)]


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def resources(kernel) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    fields = out.split("REG:")[1].split()
    res = {"REG": int(fields[0])}
    for f in fields[1:]:
        name, _, value = f.partition(":")
        if value.isdigit():
            res[name] = int(value)
    return res


# 0 (one value for all tokens) or 1 (one per sample): runtime ints, so both share one binary
STRENGTH_STRIDES = {"stride_beta": "i32", "stride_gamma": "i32", "stride_tau": "i32"}


def main() -> None:
    for F, k, pre_dtype, chunk, warps, *stages in SELECT:
        cfg = select_config(F, k, LaunchConfig(chunk=chunk, select_warps=warps, select_stages=(stages or [None])[0]))
        const = {n: cfg[n]
                 for n in ("CHUNK", "NUM_CHUNKS", "GROUPS", "CAND", "RANK_BLOCK", "EXACT_ONLY", "LOAD_STAGES")}
        sig = {"vals_ptr": "*fp32", "idx_ptr": "*i32", "cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32",
               "count_ptr": "*i32", "pre_ptr": "*" + TY[pre_dtype], "bias_ptr": "*fp32", "stride_pre": "i32",
               "F": "i32"}
        const = dict(K=k, HAS_BIAS=pre_dtype != torch.float32, **const)
        res = resources(compile_sm90(_topk_select_kernel, sig, const, cfg["num_warps"]))
        print(json.dumps({"kernel": "select", "F": F, "k": k, "pre": str(pre_dtype), "chunk": cfg["CHUNK"],
                          "num_warps": cfg["num_warps"], "load_stages": cfg["LOAD_STAGES"],
                          "exact_only": cfg["EXACT_ONLY"],
                          **res}), flush=True)
        if stages:
            continue
        # the split algorithm's three kernels at the same settings
        common = dict(CHUNK=cfg["CHUNK"], NUM_CHUNKS=cfg["NUM_CHUNKS"], GROUPS=cfg["GROUPS"],
                      HAS_BIAS=const["HAS_BIAS"])
        pre_sig = {"pre_ptr": "*" + TY[pre_dtype], "bias_ptr": "*fp32", "stride_pre": "i32", "F": "i32"}
        split = [
            ("split_group_max", _group_max_kernel, {"gmax_ptr": "*fp32", "count_ptr": "*i32", **pre_sig}, common),
            ("split_bound", _split_bound_kernel, {"lower_ptr": "*fp32", "gmax_ptr": "*fp32"},
             dict(K=k, NUM_CHUNKS=cfg["NUM_CHUNKS"], CHUNKS_POW2=cfg["CHUNKS_POW2"], GROUPS=cfg["GROUPS"],
                  EXACT_ONLY=cfg["EXACT_ONLY"])),
            ("split_candidates", _split_candidates_kernel,
             {"cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32", "count_ptr": "*i32", "lower_ptr": "*fp32", **pre_sig},
             dict(CHUNK=cfg["CHUNK"], GROUPS=cfg["GROUPS"], CAND=cfg["CAND"], HAS_BIAS=const["HAS_BIAS"])),
            ("split_rank", _split_rank_kernel,
             {"vals_ptr": "*fp32", "idx_ptr": "*i32", "cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32",
              "count_ptr": "*i32", "lower_ptr": "*fp32", **pre_sig},
             dict(K=k, CHUNK=cfg["CHUNK"], NUM_CHUNKS=cfg["NUM_CHUNKS"], CAND=cfg["CAND"], RANK_BLOCK=cfg["RANK_BLOCK"],
                  EXACT_ONLY=cfg["EXACT_ONLY"], HAS_BIAS=const["HAS_BIAS"])),
        ]
        for name, fn, sig2, const2 in split:
            if name == "split_candidates" and cfg["EXACT_ONLY"]:
                continue  # not launched on the exact path
            res = resources(compile_sm90(fn, sig2, const2, cfg["num_warps"]))
            print(json.dumps({"kernel": name, "F": F, "k": k, "pre": str(pre_dtype), "chunk": cfg["CHUNK"],
                              "num_warps": cfg["num_warps"], "exact_only": cfg["EXACT_ONLY"], **res}), flush=True)
    for d, k, dtype in DECODE:
        cfg = decode_config(d, k)
        const = dict(K=k, K_BLOCK=cfg["K_BLOCK"], BLOCK_D=cfg["BLOCK_D"])
        t = "*" + TY[dtype]
        sig = {"y_ptr": t, "h_ptr": "*fp32", "x_ptr": t, "vals_ptr": "*fp32", "idx_ptr": "*i32", "harmful_ptr": "*u8",
               "W_dec_ptr": t, "b_dec_ptr": t, "beta_ptr": "*fp32", "gamma_ptr": "*fp32", "tau_ptr": "*fp32",
               "stride_xb": "i64", "stride_xt": "i64", "stride_xd": "i64", "stride_wf": "i64", **STRENGTH_STRIDES,
               "T": "i32", "F": "i32", "d": "i32"}
        res = resources(compile_sm90(_steer_fwd_kernel, sig, const, cfg["num_warps"]))
        print(json.dumps({"kernel": "steer_decode", "d": d, "k": k, "dtype": str(dtype), **res}), flush=True)
        sig = {"out_ptr": t, "vals_ptr": "*fp32", "idx_ptr": "*i32", "W_dec_ptr": t, "b_dec_ptr": t,
               "stride_wf": "i64", "F": "i32", "d": "i32"}
        res = resources(compile_sm90(_sparse_decode_kernel, sig, const, cfg["num_warps"]))
        print(json.dumps({"kernel": "sparse_decode", "d": d, "k": k, "dtype": str(dtype), **res}), flush=True)
    for d, F, k, dtype in ONE_LAUNCH:
        scfg, dcfg = select_config(F, k), decode_config(d, k)
        pre = torch.float32 if dtype == torch.float16 else dtype  # as _launch.pre_dtype_for
        t = "*" + TY[dtype]
        sig = {"y_ptr": t, "h_ptr": "*fp32", "vals_ptr": "*fp32", "idx_ptr": "*i32", "cand_val_ptr": "*fp32",
               "cand_idx_ptr": "*i32", "count_ptr": "*i32", "pre_ptr": "*" + TY[pre], "bias_ptr": "*fp32", "x_ptr": t,
               "harmful_ptr": "*u8", "W_dec_ptr": t, "b_dec_ptr": t, "beta_ptr": "*fp32", "gamma_ptr": "*fp32",
               "tau_ptr": "*fp32", "stride_pre": "i32", "stride_xb": "i64", "stride_xt": "i64", "stride_xd": "i64",
               "stride_wf": "i64", **STRENGTH_STRIDES, "T": "i32", "F": "i32", "d": "i32", "row_start": "i32",
               "rows": "i32"}
        const = {n: scfg[n]
                 for n in ("CHUNK", "NUM_CHUNKS", "GROUPS", "CAND", "RANK_BLOCK", "EXACT_ONLY", "LOAD_STAGES")}
        const.update(K=k, HAS_BIAS=dtype != torch.float32, K_BLOCK=dcfg["K_BLOCK"], BLOCK_D=dcfg["BLOCK_D"],
                     NUM_D_BLOCKS=-(-d // dcfg["BLOCK_D"]))
        for persistent in (False, True):
            res = resources(compile_sm90(_steer_row_kernel, sig, {**const, "PERSISTENT": persistent},
                                         scfg["num_warps"]))
            print(json.dumps({"kernel": "steer_one_launch", "d": d, "F": F, "k": k, "dtype": str(dtype),
                              "persistent": persistent, "exact_only": scfg["EXACT_ONLY"], **res}), flush=True)
    for d, k, dtype in BACKWARD:
        for name, fn, sig, const in backward_kernels(d, k, dtype):
            res = resources(compile_sm90(fn, sig, const, backward_config(d, k)["num_warps"]))
            print(json.dumps({"kernel": name, "d": d, "k": k, "dtype": str(dtype), **res}), flush=True)


def backward_kernels(d: int, k: int, dtype: torch.dtype) -> list:
    """(label, kernel, signature, constexprs) of every backward launch, as the launchers make them."""
    cfg = backward_config(d, k)
    t = "*" + TY[dtype]
    g_strides = {"stride_gb": "i64", "stride_gt": "i64", "stride_gd": "i64"}
    rows = dict(K=k, K_BLOCK=cfg["K_BLOCK"], BLOCK_D=cfg["BLOCK_D"])
    out = [("steer_bwd_codes", _steer_bwd_codes_kernel,
            {"dpre_ptr": "*fp32", "coefz_ptr": "*fp32", "blend_ptr": "*fp32", "touched_ptr": "*u8", "gy_ptr": t,
             "gh_ptr": "*fp32", "h_ptr": "*fp32", "vals_ptr": "*fp32", "idx_ptr": "*i32", "harmful_ptr": "*u8",
             "W_dec_ptr": t, "beta_ptr": "*fp32", "gamma_ptr": "*fp32", "tau_ptr": "*fp32", **g_strides,
             "stride_wf": "i64", **STRENGTH_STRIDES, "T": "i32", "F": "i32", "d": "i32"}, rows),
           ("sparse_decode_bwd", _sparse_decode_bwd_kernel,
            {"dvals_ptr": "*fp32", "g_ptr": t, "idx_ptr": "*i32", "W_dec_ptr": t, **g_strides, "stride_wf": "i64",
             "T": "i32", "F": "i32", "d": "i32"}, rows)]
    for through in (True, False):  # steer's dx (grad_y passed through) and topk_encode's
        out.append((f"encoder_bwd{'_pass_through' if through else ''}", _encoder_bwd_kernel,
                    {"dx_ptr": t, "gy_ptr": t, "blend_ptr": "*fp32", "touched_ptr": "*u8" if through else "*fp32",
                     "dpre_ptr": "*fp32", "idx_ptr": "*i32", "W_t_ptr": t, **g_strides, "stride_wf": "i64",
                     "T": "i32", "F": "i32", "d": "i32"}, {**rows, "PASS_THROUGH": through}))
    for centred in (True, False):  # dW_enc (rows x - b_dec, weight sums for db_enc) and dW_dec
        out.append((f"feature_rows{'_centred' if centred else ''}", _feature_rows_kernel,
                    {"out_ptr": t, "wsum_ptr": "*fp32" if centred else t, "src_ptr": t, "sub_ptr": t, "w_ptr": "*fp32",
                     "order_ptr": "*i64", "offsets_ptr": "*i64", "stride_sb": "i64", "stride_st": "i64",
                     "stride_sd": "i64", "T": "i32", "d": "i32"},
                    dict(K=k, PAIRS=cfg["PAIRS"], BLOCK_D=cfg["BLOCK_D"], HAS_SUB=centred, HAS_WSUM=centred)))
    return out


if __name__ == "__main__":
    main()
