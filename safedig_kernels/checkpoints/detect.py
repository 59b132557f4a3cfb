"""Which format a path holds (`detect_format`) and `read_sae`, which reads any of them:

- a file: this project's format (`safedig.read_safedig`); a directory holding
  `safedig_sae.safetensors` is the same (`hub.write_pretrained`, a Hub repo's layout);
- a directory with `cfg.json` + `sae_weights.safetensors`: SAELens (`saelens.read_saelens`);
- a directory with `cfg.json` + `sae.safetensors`: one sparsify hookpoint (`sparsify.read_sparsify`).
"""
from __future__ import annotations

from typing import Optional

from ._checks import CheckpointError, DeviceLike, DTypeLike, PathLike, as_path
from ._files import require_regular_file
from ._foreign import CFG_FILENAME
from .saelens import SAELENS_WEIGHTS, read_saelens
from .safedig import PRETRAINED_WEIGHTS, read_safedig
from .sparsify import SPARSIFY_WEIGHTS, read_sparsify
from .weights import SAEWeights


def detect_format(path: PathLike) -> str:
    """"safedig" for a file or a directory holding `safedig_sae.safetensors` (`write_pretrained`),
    "saelens" or "sparsify" for a directory holding their files."""
    p = as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        require_regular_file(p, "checkpoint file")
        return "safedig"
    # exists(), not is_file(): a FIFO or directory in their place is the reader's error, not absent
    has_cfg = (p / CFG_FILENAME).exists()
    ours = (p / PRETRAINED_WEIGHTS).exists()
    saelens, sparsify = (p / SAELENS_WEIGHTS).exists(), (p / SPARSIFY_WEIGHTS).exists()
    if saelens and sparsify:
        raise CheckpointError(p, None, f"holds both {SAELENS_WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} "
                                       f"(sparsify); call load_saelens or load_sparsify (safedig_kernels.sae)")
    if ours and (saelens or sparsify):
        other = SAELENS_WEIGHTS if saelens else SPARSIFY_WEIGHTS
        raise CheckpointError(p, None, f"holds both {PRETRAINED_WEIGHTS} (this project's) and {other}; load the "
                                       f"file {p / PRETRAINED_WEIGHTS} or call load_saelens / load_sparsify")
    if ours:
        return "safedig"
    if has_cfg and saelens:
        return "saelens"
    if has_cfg and sparsify:
        return "sparsify"
    if saelens or sparsify:
        raise CheckpointError(p, None, f"{CFG_FILENAME} is missing next to the weights")
    subdirs = sorted(c.name for c in p.iterdir() if c.is_dir() and ((c / CFG_FILENAME).is_file()
                                                                    or (c / PRETRAINED_WEIGHTS).is_file()))
    hint = f"; these subdirectories hold one SAE each: {subdirs[:8]}" if subdirs else ""
    raise CheckpointError(p, None, f"not a checkpoint directory: expected {PRETRAINED_WEIGHTS} (this project's), "
                                   f"or {CFG_FILENAME} with {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} "
                                   f"(sparsify){hint}")


def read_sae(path: PathLike, device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
             activation_scale: Optional[float] = None, *, site: Optional[str] = None,
             stream: Optional[str] = None) -> SAEWeights:
    """Read a TopK SAE from `path`, whose format is detected (`detect_format`).

    `device` defaults to CPU, `dtype` to the checkpoint's own. `activation_scale`, `site` and
    `stream` are for SAELens and sparsify SAEs (`read_saelens`); this project's files have the
    scale folded and the site recorded already.
    """
    fmt = detect_format(path)
    if fmt == "safedig":
        if activation_scale is not None:
            raise ValueError(f"activation_scale applies to SAELens and sparsify checkpoints; {path} is in this "
                             f"project's format, whose weights already have it folded in")
        if site is not None or stream is not None:
            raise ValueError(f"{'site' if site is not None else 'stream'} applies to SAELens and sparsify "
                             f"checkpoints; {path} is in this project's format, whose metadata records its site")
        p = as_path(path)
        return read_safedig(p / PRETRAINED_WEIGHTS if p.is_dir() else p, device=device, dtype=dtype)
    loader = read_saelens if fmt == "saelens" else read_sparsify
    return loader(path, device=device, dtype=dtype, activation_scale=activation_scale, site=site, stream=stream)

