"""The TopK-SAE container: the five tensors the ops take, k, the harmful set, default strengths.

Weights are buffers, so `.to(device, dtype)` moves them like any module; strengths and the
harmful mask are device tensors changed in place, so a compiled graph that reads them never
recompiles when they change. Checkpoint formats live in `safedig_kernels.checkpoints`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ._checks import check_float_dtype, check_k
from ._library import MAX_FEATURES
from .ops import Harmful, Strength, as_harmful_mask, encoder_bias, harmful_for_call, strength_for_call
from .ops import sparse_decode as _sparse_decode
from .ops import topk_encode as _topk_encode
from .ops.steer import _steer_op

FORMAT_VERSION = 1


@dataclass
class SAEMetadata:
    """What a checkpoint says about its SAE besides the weights (JSON-serialisable)."""

    format_version: int = FORMAT_VERSION
    model: str = ""                    # e.g. "black-forest-labs/FLUX.1-dev"
    site: str = ""                     # e.g. "single_transformer_blocks.9"
    harmful_features: list[int] = field(default_factory=list)
    beta: float = 0.0                  # default Blend strength
    gamma: float = 0.0                 # default Repel strength
    tau: float = 0.0                   # default gate threshold
    activation_scale: float = 1.0      # trained on x * scale; already folded into the weights
    source: str = "safedig"            # format the weights were read from
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEMetadata":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAE metadata keys {unknown}; known: {sorted(known)}")
        return cls(**d)


class TopKSAE(torch.nn.Module):
    """TopK sparse autoencoder used for steering, SPEC §2.

    `W_enc` `[d, F]`, `b_enc` `[F]`, `W_dec` `[F, d]`, `b_dec` `[d]`, all of one dtype.
    `activation_scale` s folds an SAE trained on `x * s` into weights that take `x` itself.
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 k: int, metadata: Optional[SAEMetadata] = None, activation_scale: float = 1.0):
        super().__init__()
        metadata = dataclasses.replace(metadata) if metadata is not None else SAEMetadata()
        for t, name in ((W_enc, "W_enc"), (b_enc, "b_enc"), (W_dec, "W_dec"), (b_dec, "b_dec")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            check_float_dtype(t, name, allow_float64=True)
        if W_enc.dim() != 2:
            raise ValueError(f"W_enc must be [d, F], got shape {tuple(W_enc.shape)}")
        d, F = W_enc.shape
        if not 1 <= F <= MAX_FEATURES:
            raise ValueError(f"W_enc must have 1 <= F <= {MAX_FEATURES} features, got F = {F}")
        for t, name, shape in ((b_enc, "b_enc", (F,)), (W_dec, "W_dec", (F, d)), (b_dec, "b_dec", (d,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for W_enc of shape {(d, F)}, got {tuple(t.shape)}")
            if t.dtype != W_enc.dtype:
                raise TypeError(f"{name} must have W_enc's dtype {W_enc.dtype}, got {t.dtype}")
            if t.device != W_enc.device:
                raise ValueError(f"{name} must be on W_enc's device {W_enc.device}, got {t.device}")
        check_k(k, F)
        s = float(activation_scale)
        if not (s > 0 and s < float("inf")):
            raise ValueError(f"activation_scale must be a positive finite number, got {activation_scale}")
        if s != 1.0:
            # Trained on x*s: pre = (x*s - b_dec) W_enc + b_enc = (x - b_dec/s)(s W_enc) + b_enc,
            # and the reconstruction of x is (b_dec + sum z W_dec) / s.
            W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
            metadata.activation_scale = metadata.activation_scale * s
        self.k = k
        self.metadata = metadata
        self.register_buffer("W_enc", W_enc.detach().clone())
        self.register_buffer("b_enc", b_enc.detach().clone())
        self.register_buffer("W_dec", W_dec.detach().clone())
        self.register_buffer("b_dec", b_dec.detach().clone())
        self.register_buffer("harmful_mask", as_harmful_mask(metadata.harmful_features, F, W_enc.device))
        self.register_buffer("beta", torch.tensor(float(metadata.beta), device=W_enc.device))
        self.register_buffer("gamma", torch.tensor(float(metadata.gamma), device=W_enc.device))
        self.register_buffer("tau", torch.tensor(float(metadata.tau), device=W_enc.device))
        self._enc_bias_key: Optional[tuple] = None
        self._enc_bias: Optional[torch.Tensor] = None

    # -- shape ---------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.W_enc.shape[0]

    @property
    def num_features(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        return f"d={self.d}, F={self.num_features}, k={self.k}, dtype={self.dtype}, site={self.metadata.site!r}"

    # -- policy --------------------------------------------------------------------------
    def set_harmful(self, harmful: Harmful) -> None:
        """Replace the harmful set in place (feature ids or a bool mask `[F]`)."""
        mask = as_harmful_mask(harmful, self.num_features, self.device)
        self.harmful_mask.copy_(mask)
        self.metadata.harmful_features = mask.nonzero().flatten().tolist()

    def set_strengths(self, beta: Optional[float] = None, gamma: Optional[float] = None,
                      tau: Optional[float] = None) -> None:
        """Change default strengths in place; compiled graphs reading them do not recompile."""
        for name, value in (("beta", beta), ("gamma", gamma), ("tau", tau)):
            if value is not None:
                getattr(self, name).fill_(float(value))
                setattr(self.metadata, name, float(value))

    def enc_bias(self) -> torch.Tensor:
        """Cached `b_enc - b_dec @ W_enc` (fp32 `[F]`), recomputed when a weight changes."""
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (self.W_enc, self.b_enc, self.b_dec))
        if key != self._enc_bias_key or self._enc_bias is None:
            self._enc_bias = encoder_bias(self.W_enc, self.b_enc, self.b_dec)
            self._enc_bias_key = key
        return self._enc_bias

    # -- compute -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK codes of `x` `[N, d]` / `[B, T, d]`: (vals fp32, idx int32), `[..., k]`."""
        return _topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k, enc_bias=self._bias_for(x))

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reconstruction `[..., d]` from codes `[..., k]`."""
        return _sparse_decode(vals, idx, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    def steer(self, x: torch.Tensor, beta: Optional[Strength] = None, gamma: Optional[Strength] = None,
              tau: Optional[Strength] = None, harmful: Optional[Harmful] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend/Repel steering of `x` `[N, d]` or `[B, T, d]`; unset arguments use this SAE's
        defaults. Returns `y` (x's shape and dtype) and the harm score `h` `[...]` fp32."""
        dev = self.device
        mask = self.harmful_mask if harmful is None else harmful_for_call(harmful, self.num_features, dev)
        b = self.beta if beta is None else strength_for_call(beta, "beta", dev)
        g = self.gamma if gamma is None else strength_for_call(gamma, "gamma", dev)
        t = self.tau if tau is None else strength_for_call(tau, "tau", dev)
        return _steer_op(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, mask, b, g, t, self.k, self._bias_for(x))

    def _bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # The cache is a CUDA-kernel shortcut; the reference (CPU) computes from the weights.
        if not (isinstance(x, torch.Tensor) and x.is_cuda and self.W_enc.dtype != torch.float64):
            return None
        if torch.compiler.is_compiling():
            return None  # data_ptr/_version are not traceable; the op computes the bias itself
        return self.enc_bias()

    # -- checkpoints (implemented in safedig_kernels.checkpoints) -------------------------
    def save(self, path) -> None:
        """Write `path` (safetensors weights + JSON metadata in its header). Never pickles."""
        from .checkpoints import save_sae

        save_sae(self, path)

    @classmethod
    def load(cls, path, device=None, dtype=None, activation_scale: Optional[float] = None) -> "TopKSAE":
        """Read a checkpoint in this project's format, SAELens' or sparsify's (auto-detected).
        `activation_scale` is only for SAELens/sparsify SAEs trained on `x * s`."""
        from .checkpoints import load_sae

        return load_sae(path, device=device, dtype=dtype, activation_scale=activation_scale)


def random_sae(d: int, F: int, k: int, *, harmful: Sequence[int] = (), seed: int = 0,
                dtype=torch.float32, device="cpu") -> TopKSAE:
    """A seeded random SAE with unit-norm decoder rows (examples, tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, F, generator=g) / d ** 0.5
    b_enc = torch.randn(F, generator=g) * 0.01
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    b_dec = torch.randn(d, generator=g) * 0.01
    meta = SAEMetadata(harmful_features=list(harmful))
    return TopKSAE(*(t.to(device, dtype) for t in (W_enc, b_enc, W_dec, b_dec)), k=k, metadata=meta)
