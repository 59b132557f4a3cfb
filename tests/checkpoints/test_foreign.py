"""What SAELens and sparsify share (safedig_kernels/checkpoints/_foreign.py): the libraries' objects
in memory checked by the rules of their directories, the site and stream an external SAE is
recorded for, and configs in memory turned into JSON that saves."""
from __future__ import annotations

import types

import pytest
import torch
from _checkpoints import (
    D,
    F,
    _assert_same_sae,
    _lib_weights,
    _raises,
    _saelens_objects,
    _saelens_v6,
    _sparsify_cfg,
    _sparsify_weights,
    _write_saelens,
    _write_sparsify,
)

from safedig_kernels.checkpoints import CheckpointError
from safedig_kernels.sae import TopKSAE, load_sae, load_saelens, load_sparsify, save_sae


def _sparsify_coder(**over):
    cfg = _sparsify_cfg()
    t = _sparsify_weights()
    coder = types.SimpleNamespace(cfg=types.SimpleNamespace(**{k: v for k, v in cfg.items() if k != "d_in"}),
                                  d_in=D, encoder=types.SimpleNamespace(weight=t["encoder.weight"],
                                                                        bias=t["encoder.bias"]),
                                  W_dec=t["W_dec"], b_dec=t["b_dec"])
    for key, value in over.items():
        setattr(coder, key, value)
    return coder


def _saelens_sae(**over):
    obj = _saelens_objects(_saelens_v6(), _lib_weights())[2]
    for key, value in over.items():
        setattr(obj, key, value)
    return obj


_OBJECT_BAD = [
    # (id, loader, object, what the error names, key)
    ("saelens-no-cfg", TopKSAE.from_saelens, types.SimpleNamespace(W_enc=torch.zeros(D, F)), "sae", "cfg"),
    ("saelens-jumprelu", TopKSAE.from_saelens, _saelens_sae(cfg=types.SimpleNamespace(
        **_saelens_v6(architecture="jumprelu"))), "sae.cfg", "architecture"),
    ("saelens-layer-norm", TopKSAE.from_saelens, _saelens_sae(cfg=types.SimpleNamespace(
        **_saelens_v6(normalize_activations="layer_norm"))), "sae.cfg", "normalize_activations"),
    ("saelens-scale-not-given", TopKSAE.from_saelens, _saelens_sae(cfg=types.SimpleNamespace(
        **_saelens_v6(normalize_activations="expected_average_only_in"))), "sae.cfg", "normalize_activations"),
    ("saelens-W_dec-transposed", TopKSAE.from_saelens, _saelens_sae(W_dec=torch.zeros(D, F)), "sae", "W_dec"),
    ("saelens-b_dec-missing", TopKSAE.from_saelens, _saelens_sae(b_dec=None), "sae", "b_dec"),
    ("saelens-W_enc-not-a-tensor", TopKSAE.from_saelens, _saelens_sae(W_enc=[[0.0] * F] * D), "sae", "W_enc"),
    ("saelens-nan", TopKSAE.from_saelens, _saelens_sae(b_enc=torch.full((F,), float("nan"))), "sae", "b_enc"),
    ("sparsify-no-cfg", TopKSAE.from_sparsify, _sparsify_coder(cfg=None), "coder", "cfg"),
    ("sparsify-no-d_in", TopKSAE.from_sparsify, _sparsify_coder(d_in=None), "coder.cfg", "d_in"),
    ("sparsify-skip", TopKSAE.from_sparsify, _sparsify_coder(cfg=types.SimpleNamespace(
        **{k: v for k, v in _sparsify_cfg(skip_connection=True).items() if k != "d_in"})), "coder.cfg",
     "skip_connection"),
    ("sparsify-W_skip-undeclared", TopKSAE.from_sparsify, _sparsify_coder(W_skip=torch.zeros(D, D)), "coder",
     "W_skip"),
    ("sparsify-no-encoder", TopKSAE.from_sparsify, _sparsify_coder(encoder=None), "coder", "encoder.weight"),
]


@pytest.mark.parametrize("loader,obj,where,key", [pytest.param(*c[1:], id=c[0]) for c in _OBJECT_BAD])
def test_bad_library_objects_name_the_argument_and_key(loader, obj, where, key):
    _raises(CheckpointError, where, key, loader, obj)


def test_external_loaders_record_the_site_and_stream_they_are_for(tmp_path):
    root = _write_saelens(tmp_path / "sl", _saelens_v6(), _lib_weights())
    plain = load_saelens(root).metadata
    assert plain.site == "blocks.6.hook_resid_post" and "stream" not in plain.extra
    meta = load_sae(root, site="transformer_blocks.3", stream="text").metadata
    assert (meta.site, meta.extra["stream"], meta.extra["source_site"]) == (
        "transformer_blocks.3", "text", "blocks.6.hook_resid_post")
    # a sparsify hookpoint directory is named after the module: stream alone keeps that name
    sp = load_sparsify(_write_sparsify(tmp_path / "single_transformer_blocks.9", _sparsify_cfg(),
                                       _sparsify_weights()), stream="image").metadata
    assert (sp.site, sp.extra["stream"]) == ("single_transformer_blocks.9", "image") and "source_site" not in sp.extra
    assert TopKSAE.from_saelens(_saelens_sae(), site="transformer_blocks.3").metadata.extra["stream"] == "image"
    save_sae(TopKSAE.load(root, site="transformer_blocks.3", stream="both"), tmp_path / "a.safetensors")
    again = load_sae(tmp_path / "a.safetensors").metadata
    assert (again.site, again.extra["stream"], again.source) == ("transformer_blocks.3", "both", "saelens")
    with pytest.raises(ValueError, match="stream must be one of"):
        load_sae(root, stream="context")
    with pytest.raises(TypeError, match="site must be a non-empty str"):
        TopKSAE.from_saelens(_saelens_sae(), site="")
    with pytest.raises(ValueError, match="site applies to SAELens and sparsify"):
        load_sae(tmp_path / "a.safetensors", site="transformer_blocks.3")


def test_object_configs_become_json_that_saves(tmp_path):
    """A config in memory may hold what cfg.json cannot: dtype and device objects, tuples, numpy
    numbers, NaN. They are read as the JSON its save would write, so the SAE saves and reloads."""
    import numpy as np

    cfg = _saelens_v6(dtype=torch.float64, device=torch.device("cpu"), d_in=np.int64(D), seqpos_slice=(None, 3),
                      lr=np.float32(0.5), dead=float("nan"))
    sae = TopKSAE.from_saelens(types.SimpleNamespace(cfg=types.SimpleNamespace(**cfg), **_lib_weights()))
    assert sae.dtype == torch.float64 and sae.d == D
    source = sae.metadata.extra["source_cfg"]
    keys = ("dtype", "device", "d_in", "seqpos_slice", "lr", "dead")
    assert [source[k] for k in keys] == ["torch.float64", "cpu", D, [None, 3], 0.5, "nan"]
    save_sae(sae, tmp_path / "a.safetensors")
    _assert_same_sae(load_sae(tmp_path / "a.safetensors"), sae)
