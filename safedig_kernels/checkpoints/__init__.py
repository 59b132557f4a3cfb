"""TopK-SAE checkpoint formats, one module per format, under `TopKSAE` (`sae.py`).

Readers return `SAEWeights` (`weights.py`): the four tensors with every foreign convention folded
in, k and the `SAEMetadata`; `TopKSAE.from_weights` builds the module from them. Nothing here
imports the SAE container.

    weights.py    SAEWeights, SAEMetadata, FORMAT_VERSION: what readers return and writers take
    safedig.py    this project's format: one safetensors file, its metadata as JSON in the header
    saelens.py    SAELens 3.x-6.x directories and SAE objects, TopK only
    sparsify.py   EleutherAI sparsify hookpoint directories and SparseCoder objects, TopK only
    detect.py     detect_format and read_sae: which format a path holds, read whichever it is
    hub.py        save_pretrained directories, Hugging Face Hub repos and hf:// names
    _checks.py    CheckpointError and the checks every format shares (arguments, values, tensors)
    _files.py     safetensors headers and tensors, JSON files, refusing what is not a regular file
    _foreign.py   what SAELens and sparsify share: folding into spec §2, site fields, objects in memory


Nothing is ever unpickled. Every check runs before anything is returned, so a failed load leaves
nothing behind; numbers beyond the 64-bit integer or the float range are a `CheckpointError`
naming the key. docs/checkpoints.md describes each format and every option folded or refused.
"""
from __future__ import annotations

from ._checks import CheckpointDtypeError, CheckpointError
from ._foreign import STREAMS
from .detect import detect_format, read_sae
from .hub import HUB_SCHEME, hub_uri, is_hub_uri, parse_hub_uri, read_pretrained, write_pretrained
from .saelens import read_saelens, saelens_to_weights
from .safedig import HEADER_KEY, PRETRAINED_WEIGHTS, read_safedig, write_safedig
from .sparsify import read_sparsify, sparsify_to_weights
from .weights import FORMAT_VERSION, SAEMetadata, SAEWeights

__all__ = ["FORMAT_VERSION", "SAEMetadata", "SAEWeights", "CheckpointError", "CheckpointDtypeError", "HEADER_KEY",
           "read_sae", "read_safedig", "read_saelens", "read_sparsify", "write_safedig", "detect_format",
           "saelens_to_weights", "sparsify_to_weights", "read_pretrained", "write_pretrained", "PRETRAINED_WEIGHTS",
           "STREAMS", "HUB_SCHEME", "is_hub_uri", "parse_hub_uri", "hub_uri"]
