"""SAELens (safedig_kernels/checkpoints/saelens.py): directories built from SAELens' documented
key names and cfg fields, and SAE objects in memory. Each loaded SAE must compute the same
function as SAELens' forward written out below (float64 through `reference`, float32 through the
ops); bad directories raise a CheckpointError naming the file and the key."""
from __future__ import annotations

import json
from typing import Optional

import pytest
import torch
from _checkpoints import (
    _NO_CHANGE,
    WEIGHTS,
    D,
    F,
    K,
    _assert_same_sae,
    _check_same_function,
    _dense,
    _drop,
    _gen,
    _lib_weights,
    _poke,
    _raises,
    _saelens_objects,
    _saelens_v5,
    _saelens_v6,
    _saelens_v6_training,
    _set,
    _write_saelens,
    _x,
)

from safedig_kernels import reference
from safedig_kernels.checkpoints import CheckpointError, detect_format
from safedig_kernels.sae import TopKSAE, load_sae, load_saelens


def _saelens_v3(**over) -> dict:
    """An older 3.x cfg: 'standard' architecture with the topk activation, bool normalisation,
    runner-style 'activation_fn' key and no version field."""
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
           "activation_fn": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "normalize_activations": False, "context_size": 128}
    return {**cfg, **over}


def _saelens_forward(t: dict, x: torch.Tensor, k: int, apply_b_dec: bool = True, rescale: bool = False,
                     finetune: Optional[torch.Tensor] = None, scale: float = 1.0):
    """SAELens TopKSAE.encode/decode (3.x-6.x) in float64: the trainer multiplies inputs by
    the norm scaling factor s and divides outputs by it; process_sae_in subtracts
    b_dec * apply_b_dec_to_input; top-k then ReLU; rescale_acts_by_decoder_norm multiplies
    hidden_pre by the decoder norms and divides the codes by them in decode; the fine-tuning
    scaling factor multiplies the codes before W_dec. Returns (codes [N, F], decode)."""
    W_enc, b_enc, W_dec, b_dec = (t[n].double() for n in WEIGHTS)
    norms = W_dec.norm(dim=-1)
    hidden_pre = (x * scale - b_dec * apply_b_dec) @ W_enc + b_enc
    if rescale:
        hidden_pre = hidden_pre * norms
    top = torch.topk(hidden_pre, k, dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())

    def decode(a: torch.Tensor) -> torch.Tensor:
        if rescale:
            a = a / norms
        if finetune is not None:
            a = a * finetune.double()
        return (a @ W_dec + b_dec) / scale

    return acts, decode


_FSF = 0.5 + torch.rand(F, generator=_gen(9))


# (id, cfg, extra tensors, scaler json, activation_scale argument, forward options)
_SAELENS_OK = [
    ("v6", _saelens_v6(), {}, None, None, {}),
    ("v6-no-b_dec-on-input", _saelens_v6(apply_b_dec_to_input=False), {}, None, None, {"apply_b_dec": False}),
    ("v6-training-rescale", _saelens_v6_training(), {}, None, None, {"rescale": True}),
    ("v6-expected-average-scaler-json", _saelens_v6_training(normalize_activations="expected_average_only_in"),
     {}, {"scaling_factor": 3.25}, None, {"rescale": True, "scale": 3.25}),
    ("v6-expected-average-argument", _saelens_v6(normalize_activations="expected_average_only_in",
                                                 apply_b_dec_to_input=False),
     {}, None, 0.4, {"scale": 0.4, "apply_b_dec": False}),
    ("v5", _saelens_v5(), {}, None, None, {}),
    ("v5-finetuning-scale", _saelens_v5(finetuning_scaling_factor=True), {"finetuning_scaling_factor": _FSF},
     None, None, {"finetune": _FSF}),
    ("v5-no-b_dec-on-input-bool-norm", _saelens_v5(apply_b_dec_to_input=False, normalize_activations=True), {},
     None, 1.7, {"apply_b_dec": False, "scale": 1.7}),
    # SAELens drops a leftover scaling_factor that is allclose to ones; so must we.
    ("v3-standard-topk", _saelens_v3(), {"scaling_factor": torch.full((F,), 1.000001)}, None, None, {}),
    ("v3-old-scaling-factor", _saelens_v3(finetuning_scaling_factor=True), {"scaling_factor": _FSF}, None, None,
     {"finetune": _FSF}),
]


@pytest.mark.parametrize("cfg,extra,scaler,scale_arg,opts", [pytest.param(*c[1:], id=c[0]) for c in _SAELENS_OK])
def test_saelens_computes_the_same_function(tmp_path, cfg, extra, scaler, scale_arg, opts):
    t = _lib_weights()
    root = _write_saelens(tmp_path / "sae", cfg, {**t, **extra}, scaler)
    assert detect_format(root) == "saelens"
    sae64 = load_sae(root, dtype=torch.float64, activation_scale=scale_arg)
    sae32 = load_saelens(root, activation_scale=scale_arg)
    assert sae32.dtype == torch.float32 and sae32.k == K
    assert sae64.metadata.source == "saelens" and sae64.metadata.extra["source_cfg"] == cfg
    assert sae64.metadata.activation_scale == opts.get("scale", 1.0)
    assert sae64.metadata.site.startswith("blocks.") and sae64.metadata.model.startswith("gpt2")
    x = _x()
    acts, decode = _saelens_forward(t, x, K, **opts)
    _check_same_function(sae64, sae32, x, acts, decode, K)


def test_saelens_plain_layout_is_used_as_stored(tmp_path):
    """No option to fold: the tensors are SAELens' own, cast to the cfg's dtype."""
    t = _lib_weights()
    root = _write_saelens(tmp_path / "sae", _saelens_v6(dtype="bfloat16"), t)
    sae = load_sae(root)
    assert sae.dtype == torch.bfloat16
    for name in WEIGHTS:
        assert torch.equal(getattr(sae, name), t[name].to(torch.bfloat16)), name
    assert load_sae(root, dtype=torch.float32).W_enc.equal(t["W_enc"])


def test_saelens_option_folding_is_not_a_no_op(tmp_path):
    """Guards the function checks above: ignoring apply_b_dec_to_input would change the codes."""
    t = _lib_weights()
    x = _x()
    root = _write_saelens(tmp_path / "sae", _saelens_v6(apply_b_dec_to_input=False), t)
    folded = load_sae(root, dtype=torch.float64)
    acts_as_if_applied, _ = _saelens_forward(t, x, K, apply_b_dec=True)
    vals, idx = reference.topk_encode(x, folded.W_enc, folded.b_enc, folded.b_dec, K)
    assert not torch.allclose(_dense(vals, idx, F), acts_as_if_applied, atol=1e-3)


_SAELENS_BAD = [
    # (id, cfg, tensor mutation, scaler, file the error names, key)
    ("jumprelu", _saelens_v6(architecture="jumprelu"), _NO_CHANGE, None, "cfg.json", "architecture"),
    ("batchtopk", _saelens_v6(architecture="batchtopk"), _NO_CHANGE, None, "cfg.json", "architecture"),
    ("standard-relu", _saelens_v3(activation_fn="relu"), _NO_CHANGE, None, "cfg.json", "architecture"),
    ("topk-arch-relu-fn", _saelens_v5(activation_fn_str="relu"), _NO_CHANGE, None, "cfg.json", "architecture"),
    ("constant-norm-rescale", _saelens_v6(normalize_activations="constant_norm_rescale"), _NO_CHANGE, None,
     "cfg.json", "normalize_activations"),
    ("layer-norm", _saelens_v6(normalize_activations="layer_norm"), _NO_CHANGE, None, "cfg.json",
     "normalize_activations"),
    ("unknown-norm", _saelens_v6(normalize_activations="rms"), _NO_CHANGE, None, "cfg.json",
     "normalize_activations"),
    ("expected-average-without-scale", _saelens_v6(normalize_activations="expected_average_only_in"),
     _NO_CHANGE, None, "cfg.json", "normalize_activations"),
    ("scaler-json-null", _saelens_v6(normalize_activations="expected_average_only_in"), _NO_CHANGE,
     {"scaling_factor": None}, "activation_scaler.json", "scaling_factor"),
    ("hook-z", _saelens_v6(reshape_activations="hook_z"), _NO_CHANGE, None, "cfg.json", "reshape_activations"),
    ("hook-z-by-name", _saelens_v5(hook_name="blocks.4.attn.hook_z"), _NO_CHANGE, None, "cfg.json",
     "reshape_activations"),
    ("version-7", _saelens_v6(metadata={"sae_lens_version": "7.0.0"}), _NO_CHANGE, None, "cfg.json",
     "metadata.sae_lens_version"),
    ("version-garbage", _saelens_v5(sae_lens_training_version="banana"), _NO_CHANGE, None, "cfg.json",
     "sae_lens_training_version"),
    ("k-missing", _drop(_saelens_v6(), "k"), _NO_CHANGE, None, "cfg.json", "k"),
    ("k-above-d_sae", _saelens_v6(k=F + 1), _NO_CHANGE, None, "cfg.json", "k"),
    ("k-zero-old-style", _saelens_v5(activation_fn_kwargs={"k": 0}), _NO_CHANGE, None, "cfg.json",
     "activation_fn_kwargs.k"),
    ("k-disagrees", _saelens_v5(k=K + 1), _NO_CHANGE, None, "cfg.json", "k"),
    ("d_in-string", _saelens_v6(d_in="24"), _NO_CHANGE, None, "cfg.json", "d_in"),
    ("dtype-unknown", _saelens_v6(dtype="float8"), _NO_CHANGE, None, "cfg.json", "dtype"),
    ("d_in-mismatch", _saelens_v6(d_in=D + 1), _NO_CHANGE, None, "sae_weights.safetensors", "W_enc"),
    ("missing-W_dec", _saelens_v6(), lambda t: _drop(t, "W_dec"), None, "sae_weights.safetensors", "W_dec"),
    ("unexpected-threshold", _saelens_v6(), lambda t: _set(t, "threshold", torch.zeros(F)), None,
     "sae_weights.safetensors", "threshold"),
    ("scaling-factor-undeclared", _saelens_v5(), lambda t: _set(t, "scaling_factor", _FSF), None,
     "sae_weights.safetensors", "scaling_factor"),
    ("finetuning-declared-missing", _saelens_v5(finetuning_scaling_factor=True), _NO_CHANGE, None,
     "sae_weights.safetensors", "finetuning_scaling_factor"),
    ("rescale-zero-row", _saelens_v6_training(), _poke("W_dec", (7, slice(None)), 0.0), None,
     "sae_weights.safetensors", "W_dec"),
    ("nan-b_enc", _saelens_v6(), _poke("b_enc", (2,), float("nan")), None, "sae_weights.safetensors", "b_enc"),
    ("int-W_enc", _saelens_v6(), lambda t: _set(t, "W_enc", t["W_enc"].to(torch.int64)), None,
     "sae_weights.safetensors", "W_enc"),
]


@pytest.mark.parametrize("cfg,mutate,scaler,filename,key", [pytest.param(*c[1:], id=c[0]) for c in _SAELENS_BAD])
def test_bad_saelens_dir_names_file_and_key(tmp_path, cfg, mutate, scaler, filename, key):
    root = _write_saelens(tmp_path / "sae", cfg, mutate(_lib_weights()), scaler)
    _raises(CheckpointError, root / filename, key, load_sae, root)


def test_bad_saelens_json_and_truncated_weights(tmp_path):
    root = _write_saelens(tmp_path / "sae", _saelens_v6(), _lib_weights())
    (root / "cfg.json").write_text('{"architecture": "topk", ')
    assert "malformed JSON" in _raises(CheckpointError, root / "cfg.json", None, load_sae, root)
    (root / "cfg.json").write_text(json.dumps(_saelens_v6()))
    weights = root / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    _raises(CheckpointError, weights, None, load_sae, root)


@pytest.mark.parametrize("cfg,extra,scaler,scale_arg,opts", [pytest.param(*c[1:], id=c[0]) for c in _SAELENS_OK])
def test_from_saelens_equals_the_saelens_directory(tmp_path, cfg, extra, scaler, scale_arg, opts):
    """One set of rules: the object loads bit-exactly as its files do (the scaler file's s is
    given as an argument: a SAELens SAE object does not hold it)."""
    tensors = {**_lib_weights(), **extra}
    root = _write_saelens(tmp_path / "sae", cfg, tensors, scaler)
    scale = scaler["scaling_factor"] if scaler else scale_arg
    for obj in _saelens_objects(cfg, tensors):
        for dtype in (None, torch.float64):
            want = load_saelens(root, dtype=dtype, activation_scale=scale_arg)
            got = TopKSAE.from_saelens(obj, dtype=dtype, activation_scale=scale)
            _assert_same_sae(got, want)
            assert got.metadata.extra["source_cfg"] == cfg and got.metadata.source == "saelens"


def test_from_saelens_copies_the_weights():
    obj = _saelens_objects(_saelens_v6(), _lib_weights())[0]
    sae = TopKSAE.from_saelens(obj)
    before = sae.W_enc.clone()
    with torch.no_grad():
        obj.W_enc.add_(1.0)
    assert torch.equal(sae.W_enc, before) and sae.device == obj.W_enc.device
