"""Any format through `read_sae` (safedig_kernels/checkpoints/detect.py): which format a path
holds, ambiguous and wrong paths refused with what to do instead, the readers' arguments checked,
and every format surviving a trip through this project's own."""
from __future__ import annotations

import json

import pytest
import torch
from _checkpoints import (
    K,
    _assert_same_sae,
    _lib_weights,
    _raises,
    _sae,
    _saelens_v5,
    _saelens_v6,
    _saelens_v6_training,
    _sparsify_cfg,
    _sparsify_weights,
    _write_saelens,
    _write_sparsify,
)
from safetensors.torch import save_file

from safedig_kernels.checkpoints import HEADER_KEY, CheckpointError
from safedig_kernels.sae import SAEMetadata, load_sae, load_saelens, load_safedig, save_sae


def test_foreign_formats_round_trip_through_ours(tmp_path):
    sl = load_sae(_write_saelens(tmp_path / "sl", _saelens_v6_training(apply_b_dec_to_input=False),
                                 _lib_weights()))
    sp = load_sae(_write_sparsify(tmp_path / "sp" / "layers.2", _sparsify_cfg(), _sparsify_weights()))
    for i, sae in enumerate((sl, sp)):
        sae.set_harmful([0, 9])
        save_sae(sae, tmp_path / f"{i}.safetensors")
        _assert_same_sae(sae, load_sae(tmp_path / f"{i}.safetensors"))


def test_detection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_sae(tmp_path / "missing")
    root = tmp_path / "both"
    _write_saelens(root, _saelens_v6(), _lib_weights())
    save_file(_sparsify_weights(), str(root / "sae.safetensors"))
    assert "load_saelens or load_sparsify" in _raises(CheckpointError, root, None, load_sae, root)
    assert load_saelens(root).k == K  # the explicit loaders still work

    run = tmp_path / "run"  # sparsify's training output: one directory per hookpoint
    _write_sparsify(run / "layers.0", _sparsify_cfg(), _sparsify_weights())
    _write_sparsify(run / "layers.3", _sparsify_cfg(), _sparsify_weights())
    assert "['layers.0', 'layers.3']" in _raises(CheckpointError, run, None, load_sae, run)
    (run / "layers.0" / "cfg.json").unlink()
    _raises(CheckpointError, run / "layers.0", None, load_sae, run / "layers.0")

    weights = root / "sae_weights.safetensors"
    assert "pass the directory" in _raises(CheckpointError, weights, HEADER_KEY, load_sae, weights)
    _raises(CheckpointError, weights, None, load_saelens, weights)
    _raises(CheckpointError, root, None, load_safedig, root)


def test_bad_arguments(tmp_path):
    path = tmp_path / "a.safetensors"
    save_sae(_sae(), path)
    with pytest.raises(TypeError, match="path must be"):
        load_sae(3)
    with pytest.raises(TypeError, match="dtype must be"):
        load_sae(path, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_sae(path, dtype="float8")
    with pytest.raises(TypeError, match="device must be"):
        load_sae(path, device=0.5)
    with pytest.raises(ValueError, match="already have it folded"):
        load_sae(path, activation_scale=2.0)
    root = _write_saelens(tmp_path / "sl", _saelens_v6(), _lib_weights())
    with pytest.raises(ValueError, match="activation_scale must be a positive"):
        load_sae(root, activation_scale=0.0)
    with pytest.raises(TypeError, match="activation_scale must be a float"):
        load_sae(root, activation_scale="2")


def test_loaded_metadata_is_a_plain_dataclass(tmp_path):
    root = _write_saelens(tmp_path / "sl", _saelens_v5(), _lib_weights())
    meta = load_sae(root).metadata
    assert isinstance(meta, SAEMetadata)
    assert SAEMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
