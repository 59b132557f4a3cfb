"""Shared by the checkpoint tests (tests/checkpoints/) and the docs' examples (test_doc_examples.py):
a seeded SAE and the comparison of two, this project's header and tensors, SAELens and sparsify
directories and objects built from their documented key names and cfg fields, the check that a
loaded SAE computes a library's forward, and a Hugging Face Hub cache on disk with the `offline`
fixture (HF_HUB_OFFLINE=1, a Hub API that fails the test if called)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import types
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import save_file

import safedig_kernels as sk
from safedig_kernels import reference
from safedig_kernels.checkpoints import CheckpointError
from safedig_kernels.sae import FORMAT_VERSION, TopKSAE

D, F, K, N = 24, 96, 6, 40


WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


REPO_ROOT = Path(__file__).resolve().parents[1]


def _sae(dtype=torch.float32, d=D, n_feat=F, k=K, seed=0) -> TopKSAE:
    sae = sk.random_sae(d, n_feat, k, harmful=[3, 17, 40, 41], seed=seed, dtype=dtype)
    sae.metadata.model = "black-forest-labs/FLUX.1-dev"
    sae.metadata.site = "single_transformer_blocks.9"
    sae.metadata.extra = {"trained_on": ["nudity", "violence"], "steps": 1200, "note": None,
                          "nested": {"lr": 3e-4, "ok": True}}
    sae.set_strengths(beta=0.1, gamma=0.7, tau=-0.25)
    return sae


def _assert_same_sae(a: TopKSAE, b: TopKSAE) -> None:
    for name in WEIGHTS:
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
        assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), f"{name} differs bitwise"
    assert a.k == b.k
    assert a.metadata.to_dict() == b.metadata.to_dict()
    assert torch.equal(a.harmful_mask, b.harmful_mask)
    for name in ("beta", "gamma", "tau"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _raises(exc: type, path: Path, key: Optional[str], fn: Callable, *args, **kwargs) -> str:
    """fn(*args) raises `exc` whose message names `path` and `key` (quoted); returns it."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    if key is not None:
        assert repr(key) in msg, msg
    if isinstance(info.value, CheckpointError):
        assert info.value.path == str(path) and info.value.key == key, (info.value.path, info.value.key)
    return msg


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _steer_from_codes(x, acts, decode, harmful, beta, gamma, tau):
    """spec §2 from a library's dense codes `acts` [N, F] and its `decode`."""
    h = (acts * harmful).sum(-1)
    x_safe = decode(acts * ~harmful)
    r = decode(acts * harmful) - decode(torch.zeros_like(acts))
    y = torch.where((h > tau)[:, None], x + (beta * (x_safe - x) - gamma * r), x)
    return y, h


def _dense(vals: torch.Tensor, idx: torch.Tensor, n_feat: int) -> torch.Tensor:
    return torch.zeros(vals.shape[0], n_feat, dtype=vals.dtype).scatter(-1, idx.long(), vals)


def _check_same_function(sae64: TopKSAE, sae32: TopKSAE, x: torch.Tensor, acts: torch.Tensor,
                         decode: Callable, k: int) -> None:
    """The loaded SAE (float64 copy through the reference, float32 copy through the ops) gives
    the library's codes, reconstruction and steering output on x [N, d] (float64)."""
    n_feat = sae64.num_features
    harmful = torch.zeros(n_feat, dtype=torch.bool)
    harmful[::5] = True
    h_lib = (acts * harmful).sum(-1)
    h_sorted = h_lib.sort().values
    tau = float(h_sorted[N // 2 - 1] + h_sorted[N // 2]) / 2  # half the tokens gated, none at the edge
    beta, gamma = 0.6, 0.9
    y_lib, _ = _steer_from_codes(x, acts, decode, harmful, beta, gamma, tau)
    assert 0 < int((h_lib > tau).sum()) < x.shape[0]

    W_enc, b_enc, W_dec, b_dec = (getattr(sae64, n) for n in WEIGHTS)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    torch.testing.assert_close(_dense(vals, idx, n_feat), acts, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference.sparse_decode(vals, idx, W_dec, b_dec), decode(acts),
                               rtol=1e-10, atol=1e-10)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    y, h = reference.steer(x, W_enc, b_enc, W_dec, b_dec, harmful, t(beta), t(gamma), t(tau), k)
    torch.testing.assert_close(h, h_lib, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_lib, rtol=1e-10, atol=1e-10)

    # The float32 copy through the public ops: same top-k sets, values within fp32 rounding.
    x32 = x.float()
    vals32, idx32 = sae32.encode(x32)
    torch.testing.assert_close(_dense(vals32, idx32, n_feat).double(), acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae32.decode(vals32, idx32).double(), decode(acts), rtol=1e-4, atol=1e-4)
    y32, h32 = sae32.steer(x32, beta=beta, gamma=gamma, tau=tau, harmful=harmful)
    gated = (h_lib - tau).abs() > 1e-3  # tokens whose gate cannot flip under fp32 rounding
    torch.testing.assert_close(h32.double(), h_lib, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y32.double()[gated], y_lib[gated], rtol=1e-4, atol=1e-4)


def _good_doc() -> dict:
    return {"format_version": FORMAT_VERSION, "k": K, "model": "m", "site": "s", "harmful_features": [1, 2],
            "beta": 0.5, "gamma": 1.0, "tau": 0.0, "activation_scale": 1.0, "source": "safedig", "extra": {}}


def _good_tensors(n_feat: int = F) -> dict[str, torch.Tensor]:
    g = _gen(1)
    return {"W_enc": torch.randn(D, n_feat, generator=g), "b_enc": torch.randn(n_feat, generator=g),
            "W_dec": torch.randn(n_feat, D, generator=g), "b_dec": torch.randn(D, generator=g)}


def _set(t: dict, key: str, value) -> dict:
    t = dict(t)
    t[key] = value
    return t


def _drop(t: dict, key: str) -> dict:
    return {k: v for k, v in t.items() if k != key}


def _poke(key: str, index: tuple, value: float) -> Callable:
    def mutate(t: dict) -> dict:
        t = dict(t)
        t[key] = t[key].clone()
        t[key][index] = value
        return t
    return mutate


def _NO_CHANGE(t):
    return t


def _lib_weights(d: int = D, n_feat: int = F, seed: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """SAELens names and layouts: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    Decoder rows have norms in [0.5, 2] and b_dec is large, so every folded option matters."""
    g = _gen(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    W_dec = W_dec * (0.5 + 1.5 * torch.rand(n_feat, 1, generator=g))
    return {"W_enc": (torch.randn(d, n_feat, generator=g) / d ** 0.5).to(dtype),
            "b_enc": (0.1 * torch.randn(n_feat, generator=g)).to(dtype), "W_dec": W_dec.to(dtype),
            "b_dec": torch.randn(d, generator=g).to(dtype)}


def _saelens_v6(**over) -> dict:
    """cfg.json of a SAELens 6 inference TopK SAE (TopKSAEConfig.to_dict())."""
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.18.0", "sae_lens_training_version": "6.18.0",
                        "model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post",
                        "hook_head_index": None, "context_size": 128, "prepend_bos": True},
           "k": K, "rescale_acts_by_decoder_norm": False}
    return {**cfg, **over}


def _saelens_v6_training(**over) -> dict:
    """cfg.json of a SAELens 6 training checkpoint (TopKTrainingSAEConfig: rescale on by default)."""
    return _saelens_v6(rescale_acts_by_decoder_norm=True, use_sparse_activations=False,
                       aux_loss_coefficient=1.0, decoder_init_norm=0.1, **over)


def _saelens_v5(**over) -> dict:
    """cfg.json written by SAELens 3.x-5.x SAEConfig.to_dict() for a TopK SAE."""
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F, "dtype": "torch.float32", "device": "cpu",
           "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
           "hook_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
           "sae_lens_training_version": "5.11.0", "prepend_bos": True, "dataset_path": "openwebtext",
           "dataset_trust_remote_code": True, "context_size": 128, "normalize_activations": "none",
           "neuronpedia_id": None, "model_from_pretrained_kwargs": {}, "seqpos_slice": [None]}
    return {**cfg, **over}


def _write_saelens(root: Path, cfg: dict, tensors: dict, scaler: Optional[dict] = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(root / "sae_weights.safetensors"))
    if scaler is not None:
        (root / "activation_scaler.json").write_text(json.dumps(scaler))
    return root


def _x(d: int = D, seed: int = 5) -> torch.Tensor:
    return 2.0 * torch.randn(N, d, generator=_gen(seed), dtype=torch.float64)


def _sparsify_cfg(**over) -> dict:
    """cfg.json of sparsify 1.x SparseCoder.save_to_disk: SparseCoderConfig fields plus d_in."""
    cfg = {"activation": "topk", "expansion_factor": F // D, "normalize_decoder": True, "num_latents": 0,
           "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    return {**cfg, **over}


def _sparsify_weights(dtype=torch.float32, bias_shift: float = 0.0, seed: int = 3) -> dict[str, torch.Tensor]:
    """sparsify's state dict: encoder = nn.Linear(d_in, F) so encoder.weight is [F, d_in];
    W_dec [F, d_in]; b_dec [d_in]."""
    t = _lib_weights(seed=seed)
    return {"encoder.weight": t["W_enc"].t().contiguous().to(dtype),
            "encoder.bias": (t["b_enc"] + bias_shift).to(dtype), "W_dec": t["W_dec"].to(dtype),
            "b_dec": t["b_dec"].to(dtype)}


def _write_sparsify(root: Path, cfg: dict, tensors: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(root / "sae.safetensors"))
    return root


class _SAELensConfig:
    """Like SAELens' SAEConfig: fields as attributes, `to_dict()` giving what cfg.json holds."""

    def __init__(self, cfg: dict):
        self._cfg = json.loads(json.dumps(cfg))
        for key, value in cfg.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._cfg))


class _SAELensSAE(torch.nn.Module):
    """A stand-in for a SAELens SAE: `.cfg` and the parameters SAELens saves by these names."""

    def __init__(self, cfg, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        for name, t in tensors.items():
            setattr(self, name, torch.nn.Parameter(t.clone()))


def _saelens_objects(cfg: dict, tensors: dict) -> list:
    """The same SAE as SAELens objects with three kinds of config: `to_dict()`, a dataclass whose
    `architecture` is a method (SAELens 6 keeps it out of the fields), and plain attributes."""
    fields = [(k, object) for k in cfg if k != "architecture"]
    Config = dataclasses.make_dataclass("TopKSAEConfig", fields, namespace={
        "architecture": lambda self, a=cfg.get("architecture", "standard"): a})
    as_dataclass = Config(**{k: v for k, v in cfg.items() if k != "architecture"})
    as_namespace = types.SimpleNamespace(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"],
                                         b_dec=tensors["b_dec"], cfg=types.SimpleNamespace(**cfg),
                                         **{k: v for k, v in tensors.items() if k not in WEIGHTS})
    return [_SAELensSAE(_SAELensConfig(cfg), tensors), _SAELensSAE(as_dataclass, tensors), as_namespace]


def _cache_repo(cache: Path, repo_id: str, commits: dict[str, dict[str, Path]], refs: dict[str, str]) -> Path:
    """`repo_id` in the Hub cache `cache` as huggingface_hub lays it out: file contents in
    blobs/<sha256>, snapshots/<commit>/<path> linking to them, refs/<branch> holding a commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, files in commits.items():
        for rel, src in files.items():
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                link.symlink_to(os.path.relpath(blob, link.parent))
            except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
                shutil.copyfile(blob, link)
    for name, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
    return repo


def _files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, HF_HUB_OFFLINE=1, and a Hub API that fails the test if called."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read both when it was imported; it reads these module values on each call
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the Hub")

    for name in ("repo_info", "model_info", "list_repo_tree", "list_repo_files"):
        monkeypatch.setattr(hub.HfApi, name, no_network)
    return cache
