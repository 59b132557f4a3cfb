"""EleutherAI sparsify (safedig_kernels/checkpoints/sparsify.py): hookpoint directories built from
sparsify's documented key names and cfg fields, and SparseCoder objects in memory. Each loaded SAE
must compute the same function as sparsify's forward written out below; bad directories raise a
CheckpointError naming the file and the key."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from _checkpoints import (
    _NO_CHANGE,
    D,
    F,
    K,
    N,
    _assert_same_sae,
    _check_same_function,
    _drop,
    _poke,
    _raises,
    _set,
    _sparsify_cfg,
    _sparsify_weights,
    _write_sparsify,
    _x,
)

from safedig_kernels import reference
from safedig_kernels.checkpoints import CheckpointDtypeError, CheckpointError, detect_format
from safedig_kernels.sae import TopKSAE, load_sae, load_sparsify


def _sparsify_forward(t: dict, x: torch.Tensor, k: int):
    """sparsify SparseCoder.encode/decode in float64: ReLU(linear(x - b_dec)) then top-k
    (unsorted); decode sums the selected W_dec rows and adds b_dec."""
    W, b, W_dec, b_dec = (t[n].double() for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    pre = torch.relu(torch.nn.functional.linear(x - b_dec, W, b))
    top_acts, top_idx = pre.topk(k, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, top_idx, top_acts)
    return acts, (lambda a: a @ W_dec + b_dec)


_SPARSIFY_OK = [
    ("v1", _sparsify_cfg(), torch.float32),
    ("v1-num_latents-multi_topk", _sparsify_cfg(num_latents=F, expansion_factor=1, multi_topk=True), torch.float32),
    ("v1-bf16", _sparsify_cfg(normalize_decoder=False), torch.bfloat16),
    ("sae-0.x", {"expansion_factor": F // D, "normalize_decoder": True, "k": K, "signed": False, "d_in": D},
     torch.float32),
]


@pytest.mark.parametrize("cfg,dtype", [pytest.param(*c[1:], id=c[0]) for c in _SPARSIFY_OK])
def test_sparsify_computes_the_same_function(tmp_path, cfg, dtype):
    t = _sparsify_weights(dtype)
    root = _write_sparsify(tmp_path / "layers.6", cfg, t)
    assert detect_format(root) == "sparsify"
    native = load_sae(root)
    assert native.dtype == dtype and native.metadata.site == "layers.6" and native.metadata.source == "sparsify"
    assert torch.equal(native.W_enc, t["encoder.weight"].t())  # a transpose, bitwise
    sae64 = load_sparsify(root, dtype=torch.float64)
    x = _x()
    acts, decode = _sparsify_forward(t, x, K)
    _check_same_function(sae64, load_sae(root, dtype=torch.float32), x, acts, decode, K)


def test_sparsify_relu_before_topk_changes_only_zero_code_indices(tmp_path):
    """With fewer than k positive pre-activations sparsify fills the rest of its k slots with
    clamped zeros at arbitrary indices and we with the next-largest negatives ReLU'd to zero:
    the indices of those zero codes may differ, the decoded output and harm score may not."""
    t = _sparsify_weights(bias_shift=-4.0)
    root = _write_sparsify(tmp_path / "layers.6", _sparsify_cfg(), t)
    sae = load_sae(root, dtype=torch.float64)
    x = _x()
    acts, decode = _sparsify_forward(t, x, K)
    positives = (acts > 0).sum(-1)
    assert int((positives < K).sum()) > N // 2 and int((positives == K).sum()) > 0  # both regimes present
    vals, idx = reference.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, K)
    for n in range(N):
        ours = set(idx[n][vals[n] > 0].tolist())
        assert ours == set(acts[n].nonzero().flatten().tolist()), n
    _check_same_function(sae, load_sae(root), x, acts, decode, K)


_SPARSIFY_BAD = [
    ("skip-connection", _sparsify_cfg(skip_connection=True), lambda t: _set(t, "W_skip", torch.zeros(D, D)),
     "cfg.json", "skip_connection"),
    ("transcode", _sparsify_cfg(transcode=True), _NO_CHANGE, "cfg.json", "transcode"),
    ("groupmax", _sparsify_cfg(activation="groupmax"), _NO_CHANGE, "cfg.json", "activation"),
    ("signed", _sparsify_cfg(signed=True), _NO_CHANGE, "cfg.json", "signed"),
    ("d_in-missing", _drop(_sparsify_cfg(), "d_in"), _NO_CHANGE, "cfg.json", "d_in"),
    ("k-missing", _drop(_sparsify_cfg(), "k"), _NO_CHANGE, "cfg.json", "k"),
    ("k-above-F", _sparsify_cfg(k=F + 1), _NO_CHANGE, "cfg.json", "k"),
    ("num_latents-mismatch", _sparsify_cfg(num_latents=F + 4), _NO_CHANGE, "sae.safetensors", "encoder.weight"),
    ("encoder-not-transposed", _sparsify_cfg(),
     lambda t: _set(t, "encoder.weight", t["encoder.weight"].t().contiguous()), "sae.safetensors",
     "encoder.weight"),
    ("W_skip-undeclared", _sparsify_cfg(), lambda t: _set(t, "W_skip", torch.zeros(D, D)), "sae.safetensors",
     "W_skip"),
    ("missing-bias", _sparsify_cfg(), lambda t: _drop(t, "encoder.bias"), "sae.safetensors", "encoder.bias"),
    ("nan-W_dec", _sparsify_cfg(), _poke("W_dec", (1, 2), float("nan")), "sae.safetensors", "W_dec"),
]


@pytest.mark.parametrize("cfg,mutate,filename,key", [pytest.param(*c[1:], id=c[0]) for c in _SPARSIFY_BAD])
def test_bad_sparsify_dir_names_file_and_key(tmp_path, cfg, mutate, filename, key):
    root = _write_sparsify(tmp_path / "layers.6", cfg, mutate(_sparsify_weights()))
    _raises(CheckpointError, root / filename, key, load_sae, root)


def test_sparsify_mixed_dtypes_rejected(tmp_path):
    t = _sparsify_weights()
    t["b_dec"] = t["b_dec"].half()
    root = _write_sparsify(tmp_path / "layers.6", _sparsify_cfg(), t)
    msg = _raises(CheckpointDtypeError, root / "sae.safetensors", "b_dec", load_sae, root)
    assert "float16" in msg and isinstance(CheckpointDtypeError(root, None, ""), TypeError)


@pytest.mark.parametrize("cfg,dtype", [pytest.param(*c[1:], id=c[0]) for c in _SPARSIFY_OK])
def test_from_sparsify_equals_the_sparsify_directory(tmp_path, cfg, dtype):
    t = _sparsify_weights(dtype)
    root = _write_sparsify(tmp_path / "transformer_blocks.12", cfg, t)
    # sparsify's SparseCoder: cfg (a dataclass, without d_in), d_in, encoder = nn.Linear(d_in, F), W_dec, b_dec
    Config = dataclasses.make_dataclass("SparseCoderConfig", [(k, object) for k in cfg if k != "d_in"])
    coder = torch.nn.Module()
    coder.cfg = Config(**{k: v for k, v in cfg.items() if k != "d_in"})
    coder.d_in = cfg["d_in"]
    coder.encoder = torch.nn.Linear(D, F, dtype=dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(t["encoder.weight"])
        coder.encoder.bias.copy_(t["encoder.bias"])
    coder.W_dec = torch.nn.Parameter(t["W_dec"].clone())
    coder.b_dec = torch.nn.Parameter(t["b_dec"].clone())
    for site, stream in ((None, None), ("transformer_blocks.12", "text")):
        got = TopKSAE.from_sparsify(coder, site=site, stream=stream)
        want = load_sparsify(root, site=site, stream=stream)
        if site is None:  # a coder does not know its hookpoint; the directory is named after it
            assert got.metadata.site == "" and want.metadata.site == "transformer_blocks.12"
            got.metadata.site = want.metadata.site
        _assert_same_sae(got, want)
        assert got.dtype == dtype and got.metadata.extra["source_cfg"] == cfg
    assert got.metadata.extra["stream"] == "text"
