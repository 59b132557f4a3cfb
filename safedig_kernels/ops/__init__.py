"""The `safedig` custom ops: importing this package registers `torch.ops.safedig.*`.

Each op runs the PyTorch reference on CPU tensors and the Triton kernels on CUDA tensors
(`_library.use_triton_for`), and has a backward registered with it, itself an op
(`safedig::*_backward`, docs/spec.md "Gradients"). One file per op, read top to bottom: kernels,
launcher, registration, public function; the backward's kernels and launcher beside the
forward's. The public functions below are the raw-tensor entry points;
`steer` also takes Python numbers for the strengths and feature ids for the harmful set
(`_arguments`); `call_steer` is the op on tensors, without the dispatcher in plain eager
mode. Launch settings live in `_launch`.
"""
from __future__ import annotations

from ._arguments import Harmful, Strength, as_harmful_mask, as_strength, harmful_for_call, strength_for_call
from .sparse_decode import sparse_decode
from .steer import call_steer, steer
from .topk_encode import encoder_bias, topk_encode

__all__ = ["topk_encode", "sparse_decode", "steer", "call_steer", "encoder_bias", "as_strength", "as_harmful_mask",
           "strength_for_call", "harmful_for_call", "Strength", "Harmful"]
