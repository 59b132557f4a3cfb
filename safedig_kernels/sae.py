"""The TopK-SAE container: the five tensors the ops take, k, the harmful set, default strengths.

Weights are buffers, so `.to(device, dtype)` moves them like any module; strengths and the
harmful mask are device tensors changed in place, so a compiled graph that reads them never
recompiles when they change. Files are read and written through the format layer
(`checkpoints`), which returns `SAEWeights`; `TopKSAE.load` builds the module from them.

Fail closed: weights must be finite when the SAE is built or loaded into (a NaN weight turns
every code NaN, and the op then returns the activations unsteered); strengths follow the one
rule of `_checks.strength` and stay float32 whatever dtype the weights are moved to.

`save_pretrained` / `from_pretrained` are the directory layout a Hugging Face Hub repo holds
(and the Hub download); `from_saelens` / `from_sparsify` take those libraries' SAE objects in
memory. All go through `checkpoints`.

Threads: `set_strengths` writes the three strengths as one buffer with one copy, and
`set_harmful` the mask with one copy, so a steering call sees each update whole. On CUDA the
copy and the kernels that read the buffers are ordered on the current stream: update on the
stream you steer on (or synchronize). On the CPU each call copies the strengths and the mask
at its start, under the lock the updates take (`_settings`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import checkpoints, ops, reference
from ._checks import STRENGTH_NAMES, check_sae_tensors, check_steer, check_tensor, strength
from ._settings import read_settings, settings_update, write_setting
from .checkpoints import FORMAT_VERSION, SAEMetadata, SAEWeights
from .ops import Harmful, Strength, as_harmful_mask, encoder_bias, harmful_for_call, strength_for_call

__all__ = ["TopKSAE", "SAEMetadata", "SAEWeights", "FORMAT_VERSION", "random_sae", "load_sae", "save_sae",
           "load_safedig", "load_saelens", "load_sparsify"]


class TopKSAE(torch.nn.Module):
    """TopK sparse autoencoder used for steering, spec §2.

    `W_enc` `[d, F]`, `b_enc` `[F]`, `W_dec` `[F, d]`, `b_dec` `[d]`, all of one dtype.
    `activation_scale` s folds an SAE trained on `x * s` into weights that take `x` itself.
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 k: int, metadata: Optional[SAEMetadata] = None, activation_scale: float = 1.0):
        super().__init__()
        check_sae_tensors(W_enc, b_enc, W_dec, b_dec, k)
        metadata = dataclasses.replace(metadata) if metadata is not None else SAEMetadata()
        s = float(activation_scale)
        if not (s > 0 and s < float("inf")):
            raise ValueError(f"activation_scale must be a positive finite number, got {activation_scale}")
        if s != 1.0:
            # Trained on x*s: pre = (x*s - b_dec) W_enc + b_enc = (x - b_dec/s)(s W_enc) + b_enc,
            # and the reconstruction of x is (b_dec + sum z W_dec) / s.
            W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
            metadata.activation_scale = metadata.activation_scale * s
        F = W_enc.shape[1]
        self.k = k
        self.metadata = metadata
        self.register_buffer("W_enc", W_enc.detach().clone())
        self.register_buffer("b_enc", b_enc.detach().clone())
        self.register_buffer("W_dec", W_dec.detach().clone())
        self.register_buffer("b_dec", b_dec.detach().clone())
        self.register_buffer("harmful_mask", as_harmful_mask(metadata.harmful_features, F, W_enc.device,
                                                             "metadata.harmful_features"))
        values = [strength(getattr(metadata, n), n, f"metadata.{n}") for n in STRENGTH_NAMES]
        # beta, gamma, tau in one float32 buffer: one copy updates them together (threads)
        self.register_buffer("strengths", torch.tensor(values, dtype=torch.float32, device=W_enc.device))
        self._enc_bias_key: Optional[tuple] = None
        self._enc_bias: Optional[torch.Tensor] = None
        self.check_finite()

    def check_finite(self) -> None:
        """Refuse non-finite weights (a device sync: call it when weights arrive, not per step).
        A NaN weight makes every code NaN, and the op returns such tokens unsteered."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            bad = ~torch.isfinite(getattr(self, name))
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(f"TopKSAE.{name} holds {int(bad.sum())} non-finite value(s) (NaN or Inf), first at "
                                 f"index {first}; a non-finite weight would leave every token unsteered")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, all or nothing: the entries are checked (finite weights,
        strengths by the one rule, a bool harmful mask) before anything is copied, and
        `metadata` follows the strengths and harmful set loaded."""
        where = "load_state_dict"
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            value = state_dict.get(name)
            held = value if value is None or assign else value.to(getattr(self, name).dtype)
            if held is not None and not bool(torch.isfinite(held).all()):
                raise ValueError(f"{where}: {name} holds non-finite values (NaN or Inf) as {held.dtype}; a "
                                 f"non-finite weight would leave every token unsteered")
        values = state_dict.get("strengths")
        if values is not None:
            if values.shape != (len(STRENGTH_NAMES),):
                raise ValueError(f"{where}: strengths must have shape [3] (beta, gamma, tau), "
                                 f"got {list(values.shape)}")
            for n, v in zip(STRENGTH_NAMES, values.tolist()):
                strength(v, n, f"{where}: strengths ({n})")
        mask = state_dict.get("harmful_mask")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"{where}: harmful_mask must be torch.bool, got {mask.dtype}")
        own = dict(self.state_dict(keep_vars=True))
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        wrong = [f"{k}: {list(v.shape)} for {list(own[k].shape)}" for k, v in state_dict.items()
                 if k in own and v.shape != own[k].shape]
        if wrong:  # torch refuses these too, but only after copying the other entries
            raise RuntimeError(f"{where}: shapes differ from this SAE's ({'; '.join(wrong)})")
        with settings_update():  # strengths and mask change together for steering threads
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.strengths.dtype != torch.float32:  # `assign` may have brought another dtype
            self.strengths = self.strengths.to(torch.float32)
        for n, v in zip(STRENGTH_NAMES, self.strengths.tolist()):
            if float(torch.tensor(getattr(self.metadata, n), dtype=torch.float32)) != v:
                setattr(self.metadata, n, v)
        self.metadata.harmful_features = self.harmful_mask.nonzero().flatten().tolist()
        return result

    def _apply(self, fn, recurse=True):
        # `.to(torch.float16)` would cast the strengths too (tau = 1e5 becomes inf, 0.1 becomes
        # 0.10009765625): they stay float32, moved to wherever the weights went. A cast that
        # overflows a weight (to fp16) is refused and leaves the SAE as it was.
        before = dict(self._buffers)
        out = super()._apply(fn, recurse)
        if self.strengths.dtype != torch.float32:
            self.strengths = before["strengths"].to(device=self.strengths.device, dtype=torch.float32)
        narrowed = self.W_enc.dtype != before["W_enc"].dtype and self.W_enc.device.type != "meta"
        try:
            if narrowed:  # a move alone cannot make a weight non-finite; a cast can
                self.check_finite()
        except ValueError as e:
            self._buffers.update(before)
            raise ValueError(f"{e} after the conversion (.to / .half / ...): the SAE is left as it was") from None
        return out

    # beta, gamma, tau: 0-d views of the strengths buffer (change them with set_strengths)
    @property
    def beta(self) -> torch.Tensor:
        return self.strengths[0]

    @property
    def gamma(self) -> torch.Tensor:
        return self.strengths[1]

    @property
    def tau(self) -> torch.Tensor:
        return self.strengths[2]

    @classmethod
    def from_weights(cls, weights: SAEWeights) -> "TopKSAE":
        """The SAE a checkpoint reader returned (`checkpoints.read_sae` and friends)."""
        return cls(weights.W_enc, weights.b_enc, weights.W_dec, weights.b_dec, k=weights.k, metadata=weights.metadata)

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
        write_setting(self.harmful_mask, mask)
        self.metadata.harmful_features = mask.nonzero().flatten().tolist()

    def set_strengths(self, beta: Optional[float] = None, gamma: Optional[float] = None,
                      tau: Optional[float] = None) -> None:
        """Change default strengths in place; compiled graphs reading them do not recompile.
        All are checked before any changes, and the three are written with one copy."""
        given = dict(zip(STRENGTH_NAMES, (beta, gamma, tau)))
        new = {n: strength(v, n) for n, v in given.items() if v is not None}
        if not new:
            return
        # the others as the buffer holds them: metadata is a plain dataclass anyone may edit
        row = [new.get(n, v) for n, v in zip(STRENGTH_NAMES, self.strengths.tolist())]
        write_setting(self.strengths, torch.tensor(row, dtype=torch.float32))
        for n, v in new.items():
            setattr(self.metadata, n, v)

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
        return ops.topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k, enc_bias=self._bias_for(x))

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reconstruction `[..., d]` from codes `[..., k]`."""
        return ops.sparse_decode(vals, idx, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    def steer(self, x: torch.Tensor, beta: Optional[Strength] = None, gamma: Optional[Strength] = None,
              tau: Optional[Strength] = None, harmful: Optional[Harmful] = None, *,
              enc_bias: Optional[torch.Tensor] = None, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend/Repel steering of `x` `[N, d]` or `[B, T, d]`; unset arguments use this SAE's
        defaults. Returns `y` (x's shape and dtype) and the harm score `h` `[...]` fp32.

        `enc_bias`: a folded encoder bias the caller keeps up to date (fp32 `[F]`), else this
        SAE's own cache. `fused=False` runs the PyTorch reference instead of the op (the
        baseline benchmarks compare against)."""
        dev = self.device
        mask = self.harmful_mask if harmful is None else harmful_for_call(harmful, self.num_features, dev)
        # One read of the settings: a concurrent set_strengths / set_harmful is seen whole or not at all.
        own, mask = read_settings(self.strengths, mask)
        own_b, own_g, own_t = own.unbind()
        b = own_b if beta is None else strength_for_call(beta, "beta", dev)
        g = own_g if gamma is None else strength_for_call(gamma, "gamma", dev)
        t = own_t if tau is None else strength_for_call(tau, "tau", dev)
        tensors = (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        check_tensor(x, "x")  # the rest are this SAE's own tensors, or made so above
        if fused:  # the op checks its contract itself
            enc_bias = enc_bias if enc_bias is not None else self._bias_for(x)
            return ops.call_steer(x, *tensors, mask, b, g, t, self.k, enc_bias)
        if not torch.compiler.is_compiling():  # traced, the reference's own shape errors apply
            check_steer(x, *tensors, mask, b, g, t, self.k, allow_float64=True)
        return reference.steer(x, *tensors, mask, b, g, t, self.k)

    def _bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # The cache is a CUDA-kernel shortcut; the reference (CPU) computes from the weights.
        if not (isinstance(x, torch.Tensor) and x.is_cuda and self.W_enc.dtype != torch.float64):
            return None
        if torch.compiler.is_compiling():
            return None  # data_ptr/_version are not traceable; the op computes the bias itself
        return self.enc_bias()

    # -- files ---------------------------------------------------------------------------
    def to_weights(self) -> SAEWeights:
        """What a checkpoint of this SAE holds. The buffers are what it steers with; the
        metadata's copies are kept where they agree with them (the caller's exact floats and
        id order), replaced by the buffers' values where they do not."""
        meta = dataclasses.replace(self.metadata, extra=self.metadata.extra)
        mask = self.harmful_mask.detach().cpu()
        try:
            declared = torch.zeros(self.num_features, dtype=torch.bool)
            declared[torch.tensor([int(i) for i in meta.harmful_features], dtype=torch.int64)] = True
            ids_ok = bool(torch.equal(declared, mask)) and all(
                isinstance(i, int) and 0 <= i < self.num_features for i in meta.harmful_features)
        except (IndexError, TypeError, ValueError, RuntimeError):
            ids_ok = False
        if not ids_ok:
            meta.harmful_features = mask.nonzero().flatten().tolist()
        for name in ("beta", "gamma", "tau"):
            buf = getattr(self, name).detach().cpu()
            try:
                same = float(torch.tensor(float(getattr(meta, name)), dtype=buf.dtype)) == float(buf)
            except (TypeError, ValueError):
                same = False
            setattr(meta, name, float(getattr(meta, name)) if same else float(buf))
        return SAEWeights(self.W_enc, self.b_enc, self.W_dec, self.b_dec, k=int(self.k), metadata=meta)

    def save(self, path) -> None:
        """Write `path` (safetensors weights + JSON metadata in its header). Never pickles."""
        checkpoints.write_safedig(path, self.to_weights())

    @classmethod
    def load(cls, path, device=None, dtype=None, activation_scale: Optional[float] = None, *,
             site: Optional[str] = None, stream: Optional[str] = None) -> "TopKSAE":
        """Read a checkpoint in this project's format, SAELens' or sparsify's (auto-detected).
        `activation_scale` (trained on `x * s`), `site` and `stream` (the diffusers site and
        token stream it was trained on) are only for SAELens/sparsify SAEs."""
        return cls.from_weights(checkpoints.read_sae(path, device=device, dtype=dtype,
                                                     activation_scale=activation_scale, site=site, stream=stream))

    def save_pretrained(self, directory) -> Path:
        """Write `directory/safedig_sae.safetensors` (this project's format, atomic; the
        directory is made): the layout `from_pretrained` reads locally and from a Hub repo
        (upload the directory as the repo or one subfolder of it). Returns the file's path."""
        return checkpoints.write_pretrained(directory, self.to_weights())

    @classmethod
    def from_pretrained(cls, repo_id_or_path, *, subfolder: Optional[str] = None, revision: Optional[str] = None,
                        device=None, dtype=None, activation_scale: Optional[float] = None,
                        site: Optional[str] = None, stream: Optional[str] = None, cache_dir=None,
                        local_files_only: bool = False, token=None) -> "TopKSAE":
        """An SAE from a local path or a Hugging Face Hub repo (`checkpoints.read_pretrained`).

        `repo_id_or_path`: an existing local file or directory (a `save_pretrained` directory,
        this project's file, a SAELens or sparsify directory), an `"owner/name"` repo id, or
        `"hf://owner/name[/subfolder][@revision]"`. `subfolder` picks a folder of the directory
        or repo, `revision` a branch, tag or commit. Hub files are downloaded into the Hub cache
        (`cache_dir`, default `HF_HUB_CACHE`) and read from it without network when
        `HF_HUB_OFFLINE=1` or `local_files_only=True`. Needs huggingface_hub for Hub repos
        (`pip install 'safedig-kernels[diffusers]'`); local paths do not."""
        return cls.from_weights(checkpoints.read_pretrained(
            repo_id_or_path, subfolder=subfolder, revision=revision, device=device, dtype=dtype,
            activation_scale=activation_scale, site=site, stream=stream, cache_dir=cache_dir,
            local_files_only=local_files_only, token=token))

    @classmethod
    def from_saelens(cls, sae, *, device=None, dtype=None, activation_scale: Optional[float] = None,
                     site: Optional[str] = None, stream: Optional[str] = None) -> "TopKSAE":
        """The TopK SAE a SAELens `SAE` object in memory computes (`.cfg`, `.W_enc`, `.b_enc`,
        `.W_dec`, `.b_dec`; sae_lens is not imported), with the same checks and folds as
        `load_saelens` (`checkpoints.saelens_to_weights`). `device` defaults to the object's,
        `dtype` to its config's; `site`/`stream` record the diffusers site it was trained on."""
        return cls.from_weights(checkpoints.saelens_to_weights(sae, device=device, dtype=dtype,
                                                               activation_scale=activation_scale, site=site,
                                                               stream=stream))

    @classmethod
    def from_sparsify(cls, coder, *, device=None, dtype=None, activation_scale: Optional[float] = None,
                      site: Optional[str] = None, stream: Optional[str] = None) -> "TopKSAE":
        """The TopK SAE a sparsify `SparseCoder` in memory computes (`.cfg`, `.d_in`, `.encoder`,
        `.W_dec`, `.b_dec`; sparsify is not imported), with the same checks as `load_sparsify`
        (`checkpoints.sparsify_to_weights`). A coder does not know its hookpoint: give `site`
        (e.g. the module path it was trained on, `"transformer_blocks.12"`)."""
        return cls.from_weights(checkpoints.sparsify_to_weights(coder, device=device, dtype=dtype,
                                                                activation_scale=activation_scale, site=site,
                                                                stream=stream))


# Functions over whole SAEs, one per reader of the format layer.

def load_sae(path, device=None, dtype=None, activation_scale: Optional[float] = None, *,
             site: Optional[str] = None, stream: Optional[str] = None) -> TopKSAE:
    """`TopKSAE.load`: any supported format, detected from the path."""
    return TopKSAE.load(path, device=device, dtype=dtype, activation_scale=activation_scale, site=site,
                        stream=stream)


def load_safedig(path, device=None, dtype=None) -> TopKSAE:
    return TopKSAE.from_weights(checkpoints.read_safedig(path, device=device, dtype=dtype))


def load_saelens(path, device=None, dtype=None, activation_scale: Optional[float] = None, *,
                 site: Optional[str] = None, stream: Optional[str] = None) -> TopKSAE:
    return TopKSAE.from_weights(checkpoints.read_saelens(path, device=device, dtype=dtype,
                                                         activation_scale=activation_scale, site=site,
                                                         stream=stream))


def load_sparsify(path, device=None, dtype=None, activation_scale: Optional[float] = None, *,
                  site: Optional[str] = None, stream: Optional[str] = None) -> TopKSAE:
    return TopKSAE.from_weights(checkpoints.read_sparsify(path, device=device, dtype=dtype,
                                                          activation_scale=activation_scale, site=site,
                                                          stream=stream))


def save_sae(sae: TopKSAE, path) -> None:
    """`sae.save(path)`."""
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"sae must be a TopKSAE, got {type(sae).__name__}")
    sae.save(path)


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
