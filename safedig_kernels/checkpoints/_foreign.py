"""What the SAELens and sparsify readers share: `fold`, which turns a foreign forward pass into
the four tensors spec §2 computes with; the directory both libraries save to; the site and stream
an external SAE is recorded for (`site_fields`); and reading a library's SAE object in memory
(duck-typed: neither library is imported) as the dict and tensors its save would write.
"""
from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence

import torch

from .._io import MAX_JSON_DEPTH
from ._checks import CheckpointError, Where, as_path, finite

CFG_FILENAME = "cfg.json"


def _compute_dtype(*dtypes: Optional[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def fold(path: Where, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
         target: torch.dtype, *, apply_b_dec_to_input: bool = True, rescale_by_decoder_norm: bool = False,
         decoder_scale: Optional[torch.Tensor] = None, activation_scale: float = 1.0,
         weights_key: str = "W_dec") -> dict[str, torch.Tensor]:
    """The four spec §2 tensors, computed in float32 (float64 when the stored or the `target`
    dtype is float64); returned unchanged when there is nothing to fold.

    Foreign forward (s = activation_scale, n = decoder row norms, f = decoder_scale):
        pre = ((s x - [apply] b_dec) W_enc + b_enc) * [rescale] n
        x_hat = (b_dec + sum_j z_j / [rescale] n_j * [f] f_j * W_dec[j]) / s
    Returned: W_enc' = s W_enc n, b_enc' = (b_enc + [not apply] b_dec W_enc) n,
    W_dec' = W_dec f / (n s), b_dec' = b_dec / s, so that
    (x - b_dec') W_enc' + b_enc' = pre and b_dec' + sum_j z_j W_dec'[j] = x_hat.
    """
    if (apply_b_dec_to_input and not rescale_by_decoder_norm and decoder_scale is None
            and activation_scale == 1.0):
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cd = _compute_dtype(target, *(t.dtype for t in (W_enc, b_enc, W_dec, b_dec)))
    W_enc, b_enc, W_dec, b_dec = (t.to(cd) for t in (W_enc, b_enc, W_dec, b_dec))
    if rescale_by_decoder_norm:
        norms = W_dec.norm(dim=-1)
        zero = (norms == 0).nonzero().flatten()
        if zero.numel():
            raise CheckpointError(path, weights_key, f"rescale_acts_by_decoder_norm needs nonzero decoder "
                                  f"rows, but row(s) {zero[:8].tolist()} are all zero (the library "
                                  f"itself would produce NaN for them)")
    if not apply_b_dec_to_input:
        b_enc = b_enc + b_dec @ W_enc
    if decoder_scale is not None:
        W_dec = W_dec * decoder_scale.to(cd)[:, None]
    if rescale_by_decoder_norm:
        W_enc = W_enc * norms[None, :]
        b_enc = b_enc * norms
        W_dec = W_dec / norms[:, None]
    if activation_scale != 1.0:
        W_enc, W_dec, b_dec = W_enc * activation_scale, W_dec / activation_scale, b_dec / activation_scale
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def as_dir(path: Any) -> Path:
    """The directory a SAELens or sparsify checkpoint is saved in; a file there is refused."""
    p = as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such directory")
    if not p.is_dir():
        raise CheckpointError(p, None, "SAELens and sparsify checkpoints are directories "
                                       "(cfg.json plus a .safetensors file), this is a file")
    return p


STREAMS = ("image", "text", "both")  # what an SAE may record as the stream of the site it was trained at


def check_site_args(site: Optional[str], stream: Optional[str]) -> None:
    if site is not None and (not isinstance(site, str) or not site):
        raise TypeError(f"site must be a non-empty str naming a diffusers module (e.g. 'transformer_blocks.12'), "
                        f"got {site!r}")
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")


def site_fields(site: Optional[str], stream: Optional[str], default_site: str) -> tuple[str, dict[str, Any]]:
    """(metadata.site, metadata.extra entries) of an external SAE. Given `site` or `stream`,
    they are recorded as this project's training records its own (`metadata.site`,
    `extra["stream"]`, the stream defaulting to "image", a block's hidden_states output), and
    the integration then refuses the SAE at another site; the site defaults to the library's
    own name for it (SAELens' hook_name, sparsify's directory name). Neither given: only that
    name, which is not checked."""
    if site is None and stream is None:
        return default_site, {}
    used: dict[str, Any] = {"stream": stream or "image"}
    if site is not None and default_site and site != default_site:
        used["source_site"] = default_site  # the library's own name, kept for provenance
    return site or default_site, used


def plain(value: Any, where: str, depth: int = 0) -> Any:
    """`value` as JSON (a config object's fields go into metadata.extra, which is saved as
    JSON): nested configs become dicts, tuples lists, dtypes and other objects their str."""
    if depth > MAX_JSON_DEPTH - 2:  # the header and extra add two levels
        raise CheckpointError(where, None, f"nested more than {MAX_JSON_DEPTH - 2} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy and other integer scalars
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if finite(value) else str(value)  # JSON has no NaN/Inf
    if isinstance(value, Mapping):
        return {str(k): plain(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, where, depth + 1) for v in value]
    if callable(getattr(value, "to_dict", None)) and not isinstance(value, type):
        return plain(value.to_dict(), where, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where, depth + 1)
    if isinstance(value, SimpleNamespace):
        return plain(vars(value), where, depth + 1)
    return str(value)


def object_cfg(cfg: Any, where: str) -> dict[str, Any]:
    """A library's config object as the dict its save writes to cfg.json: its `to_dict()`
    (SAELens and sparsify configs have one), else a mapping's, dataclass's or object's fields."""
    if isinstance(cfg, Mapping):
        d: Any = cfg
    elif callable(getattr(cfg, "to_dict", None)):
        d = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    elif hasattr(cfg, "__dict__"):
        d = vars(cfg)
    else:
        raise CheckpointError(where, None, f"expected the library's config object (with to_dict(), a dataclass "
                                           f"or a mapping), found {type(cfg).__name__}")
    if not isinstance(d, Mapping):
        raise CheckpointError(where, None, f"to_dict() returned {type(d).__name__}, expected a dict")
    return plain(d, where)


def object_tensors(obj: Any, names: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    """The tensors of a library object by attribute path ("encoder.weight"), detached. Absent
    or None ones are left out (the key check names what is missing); all share one device."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        value = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(where, name, f"expected a torch.Tensor, found {type(value).__name__}")
        out[name] = value.detach()
    devices = {t.device for t in out.values()}
    if len(devices) > 1:
        found = ", ".join(f"{n} on {t.device}" for n, t in out.items())
        raise CheckpointError(where, None, f"tensors on more than one device ({found}); move the object to one")
    return out

