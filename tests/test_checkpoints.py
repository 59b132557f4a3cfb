"""Checkpoints (safedig_kernels.checkpoints): this project's format, SAELens, sparsify.

- own format: bitwise round trips in bf16/fp16/fp32, dtype/device conversion on load;
- SAELens and sparsify directories built here from their documented key names and cfg
  fields; each loaded SAE must compute the same function as that library's forward written
  out below (float64 through `reference`, float32 through the ops);
- every bad file raises a CheckpointError (ValueError) naming the file and the key: numbers
  beyond the 64-bit or float range and JSON nested too deeply included; a FIFO, device, socket
  or directory where a file belongs is refused before it is opened (a FIFO would hang);
- an interrupted save leaves the earlier file intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import save_file
from test_io import SPECIAL_KINDS, SpecialFiles, assert_not_regular, posix_only

import safedig_kernels as sk
from safedig_kernels import checkpoints as ckpt
from safedig_kernels import reference
from safedig_kernels.checkpoints import HEADER_KEY, CheckpointDtypeError, CheckpointError, detect_format
from safedig_kernels.sae import (
    FORMAT_VERSION,
    SAEMetadata,
    TopKSAE,
    load_sae,
    load_saelens,
    load_safedig,
    load_sparsify,
    save_sae,
)

D, F, K, N = 24, 96, 6, 40
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
LOWP = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.float32, id="fp32")]
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------
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


# -- own format: round trips -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP)
def test_roundtrip_is_bitwise(tmp_path, dtype):
    sae = _sae(dtype)
    path = tmp_path / "site.safetensors"
    save_sae(sae, path)
    loaded = load_sae(path)
    _assert_same_sae(sae, loaded)
    assert loaded.metadata.extra == sae.metadata.extra and loaded.metadata.beta == 0.1
    # Writing what was read gives the same bytes: nothing drifts across generations.
    save_sae(loaded, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_container_methods_delegate(tmp_path):
    sae = _sae(torch.bfloat16)
    sae.save(str(tmp_path / "a.safetensors"))
    _assert_same_sae(sae, TopKSAE.load(tmp_path / "a.safetensors"))
    root = _write_saelens(tmp_path / "sl", _saelens_v6(normalize_activations="expected_average_only_in"),
                          _lib_weights())
    assert TopKSAE.load(root, dtype=torch.float64, activation_scale=2.0).metadata.activation_scale == 2.0


def test_header_holds_documented_json(tmp_path):
    from safetensors import safe_open

    sae = _sae()
    save_sae(sae, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        doc = json.loads(f.metadata()[HEADER_KEY])
        assert sorted(f.keys()) == sorted(WEIGHTS)
    assert doc == {"format_version": FORMAT_VERSION, "k": K, "model": sae.metadata.model,
                   "site": sae.metadata.site, "harmful_features": [3, 17, 40, 41], "beta": 0.1,
                   "gamma": 0.7, "tau": -0.25, "activation_scale": 1.0, "source": "safedig",
                   "extra": sae.metadata.extra}


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.float32), (torch.float32, torch.float64)],
                         ids=["fp32-bf16", "bf16-fp32", "fp16-fp32", "fp32-fp64"])
def test_load_converts_dtype(tmp_path, src, dst):
    sae = _sae(src)
    save_sae(sae, tmp_path / "a.safetensors")
    loaded = load_sae(tmp_path / "a.safetensors", dtype=dst, device="cpu")
    for name in WEIGHTS:
        assert getattr(loaded, name).dtype == dst
        assert torch.equal(getattr(loaded, name), getattr(sae, name).to(dst)), name
    assert loaded.metadata.to_dict() == sae.metadata.to_dict()
    by_name = load_sae(tmp_path / "a.safetensors", dtype=str(dst), device=torch.device("cpu"))
    assert by_name.dtype == dst


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    sae = _sae(torch.bfloat16)
    save_sae(sae, tmp_path / "a.safetensors")
    loaded = load_sae(tmp_path / "a.safetensors", device="cuda")
    assert loaded.device.type == "cuda" and loaded.harmful_mask.device.type == "cuda"
    assert torch.equal(loaded.W_dec.cpu(), sae.W_dec)
    save_sae(loaded, tmp_path / "b.safetensors")  # saving from the GPU goes through the CPU
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_folded_activation_scale_is_not_folded_again(tmp_path):
    base = _sae()
    scaled = TopKSAE(base.W_enc, base.b_enc, base.W_dec, base.b_dec, k=K, metadata=base.metadata,
                     activation_scale=2.5)
    save_sae(scaled, tmp_path / "a.safetensors")
    loaded = load_sae(tmp_path / "a.safetensors")
    assert loaded.metadata.activation_scale == 2.5
    _assert_same_sae(scaled, loaded)


def test_save_writes_what_the_sae_steers_with(tmp_path):
    sae = _sae()
    sae.harmful_mask.zero_()  # changed behind the metadata's back
    sae.harmful_mask[[5, 2]] = True
    sae.beta.fill_(0.75)
    save_sae(sae, tmp_path / "a.safetensors")
    meta = load_sae(tmp_path / "a.safetensors").metadata
    assert meta.harmful_features == [2, 5] and meta.beta == 0.75
    assert meta.gamma == 0.7 and meta.tau == -0.25  # untouched ones keep their exact floats


def test_save_rejects_bad_arguments(tmp_path):
    sae = _sae()
    with pytest.raises(TypeError, match="sae must be a TopKSAE"):
        save_sae(torch.nn.Linear(2, 2), tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_sae(sae, 3)
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        save_sae(sae, tmp_path)
    with pytest.raises(FileNotFoundError, match="parent directory"):
        save_sae(sae, tmp_path / "missing" / "a.safetensors")
    sae.metadata.extra = {"tensor": torch.zeros(1)}
    with pytest.raises(TypeError, match="metadata.extra"):
        save_sae(sae, tmp_path / "a.safetensors")
    sae = _sae()
    sae.W_dec[4, 2] = float("nan")
    _raises(CheckpointError, tmp_path / "a.safetensors", "W_dec", save_sae, sae, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


# -- own format: bad files -------------------------------------------------------------------
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


# (id, tensor mutation, header-doc mutation, key named in the error, exception type)
_BAD_OWN = [
    ("missing-W_dec", lambda t: _drop(t, "W_dec"), None, "W_dec", CheckpointError),
    ("unexpected-tensor", lambda t: _set(t, "W_skip", torch.zeros(D, D)), None, "W_skip", CheckpointError),
    ("W_dec-transposed", lambda t: _set(t, "W_dec", t["W_dec"].t().contiguous()), None, "W_dec", CheckpointError),
    ("b_enc-short", lambda t: _set(t, "b_enc", t["b_enc"][:-1].clone()), None, "b_enc", CheckpointError),
    ("b_dec-2d", lambda t: _set(t, "b_dec", t["b_dec"][None].clone()), None, "b_dec", CheckpointError),
    ("W_enc-1d", lambda t: _set(t, "W_enc", t["W_enc"].flatten().clone()), None, "W_enc", CheckpointError),
    ("b_dec-fp16", lambda t: _set(t, "b_dec", t["b_dec"].half()), None, "b_dec", CheckpointDtypeError),
    ("W_enc-int", lambda t: {k: v.to(torch.int32) for k, v in t.items()}, None, "W_enc", CheckpointDtypeError),
    ("nan-W_enc", _poke("W_enc", (3, 7), float("nan")), None, "W_enc", CheckpointError),
    ("inf-b_dec", _poke("b_dec", (5,), float("inf")), None, "b_dec", CheckpointError),
    ("neg-inf-W_dec", _poke("W_dec", (0, 0), float("-inf")), None, "W_dec", CheckpointError),
    ("nan-b_enc", _poke("b_enc", (F - 1,), float("nan")), None, "b_enc", CheckpointError),
    ("k-zero", _NO_CHANGE, lambda d: _set(d, "k", 0), "k", CheckpointError),
    ("k-above-F", _NO_CHANGE, lambda d: _set(d, "k", F + 1), "k", CheckpointError),
    ("k-bool", _NO_CHANGE, lambda d: _set(d, "k", True), "k", CheckpointError),
    ("k-float", _NO_CHANGE, lambda d: _set(d, "k", 2.5), "k", CheckpointError),
    ("k-missing", _NO_CHANGE, lambda d: _drop(d, "k"), "k", CheckpointError),
    ("version-newer", _NO_CHANGE, lambda d: _set(d, "format_version", FORMAT_VERSION + 1), "format_version",
     CheckpointError),
    ("version-zero", _NO_CHANGE, lambda d: _set(d, "format_version", 0), "format_version", CheckpointError),
    ("version-string", _NO_CHANGE, lambda d: _set(d, "format_version", "1"), "format_version", CheckpointError),
    ("version-missing", _NO_CHANGE, lambda d: _drop(d, "format_version"), "format_version", CheckpointError),
    ("field-missing", _NO_CHANGE, lambda d: _drop(d, "tau"), "tau", CheckpointError),
    ("field-unknown", _NO_CHANGE, lambda d: _set(d, "colour", "red"), "colour", CheckpointError),
    ("harmful-out-of-range", _NO_CHANGE, lambda d: _set(d, "harmful_features", [1, F]), "harmful_features",
     CheckpointError),
    ("harmful-negative", _NO_CHANGE, lambda d: _set(d, "harmful_features", [-1]), "harmful_features",
     CheckpointError),
    ("harmful-not-list", _NO_CHANGE, lambda d: _set(d, "harmful_features", "1,2"), "harmful_features",
     CheckpointError),
    ("beta-nan", _NO_CHANGE, lambda d: _set(d, "beta", float("nan")), "beta", CheckpointError),
    ("scale-negative", _NO_CHANGE, lambda d: _set(d, "activation_scale", -2.0), "activation_scale",
     CheckpointError),
    ("model-not-str", _NO_CHANGE, lambda d: _set(d, "model", 7), "model", CheckpointError),
    ("extra-not-dict", _NO_CHANGE, lambda d: _set(d, "extra", [1]), "extra", CheckpointError),
]


@pytest.mark.parametrize("mutate_t,mutate_doc,key,exc", [pytest.param(*c[1:], id=c[0]) for c in _BAD_OWN])
def test_bad_own_file_names_file_and_key(tmp_path, mutate_t, mutate_doc, key, exc):
    path = tmp_path / "bad.safetensors"
    doc = (mutate_doc or _NO_CHANGE)(_good_doc())
    save_file(mutate_t(_good_tensors()), str(path), metadata={HEADER_KEY: json.dumps(doc)})
    _raises(exc, path, key, load_sae, path)


def test_k_above_package_limit(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(_good_tensors(300), str(path), metadata={HEADER_KEY: json.dumps(_set(_good_doc(), "k", 257))})
    assert "limit of 256" in _raises(CheckpointError, path, "k", load_sae, path)


@pytest.mark.parametrize("header,needle", [("{not json", "malformed JSON"), ("[1, 2]", "JSON object")],
                         ids=["malformed", "list"])
def test_bad_header_json(tmp_path, header, needle):
    path = tmp_path / "bad.safetensors"
    save_file(_good_tensors(), str(path), metadata={HEADER_KEY: header})
    assert needle in _raises(CheckpointError, path, HEADER_KEY, load_sae, path)


def test_plain_safetensors_file_is_not_ours(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(_good_tensors(), str(path), metadata={"format": "pt"})
    assert "pass the directory" in _raises(CheckpointError, path, HEADER_KEY, load_sae, path)


@pytest.mark.parametrize("keep", [0, 5, 8, 60, -1], ids=["empty", "5B", "8B", "mid-header", "last-byte"])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "t.safetensors"
    save_sae(_sae(), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    assert "truncated or corrupted" in _raises(CheckpointError, path, None, load_sae, path)


def test_corrupted_header(tmp_path):
    path = tmp_path / "c.safetensors"
    save_sae(_sae(), path)
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))
    _raises(CheckpointError, path, None, load_sae, path)
    data = bytearray(path.read_bytes())
    data[:8] = (1 << 60).to_bytes(8, "little")  # header length far beyond the file
    path.write_bytes(bytes(data))
    _raises(CheckpointError, path, None, load_sae, path)


def test_corrupted_tensor_bytes_are_caught_as_non_finite(tmp_path):
    path = tmp_path / "c.safetensors"
    save_sae(_sae(), path)
    data = bytearray(path.read_bytes())
    # Layout per the safetensors spec: u64 header length, JSON header, then the data buffer.
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + json.loads(data[8:8 + n])["W_dec"]["data_offsets"][0]
    data[start:start + 4] = b"\xff\xff\xff\xff"  # W_dec[0, 0] becomes a float32 NaN
    path.write_bytes(bytes(data))
    assert "non-finite" in _raises(CheckpointError, path, "W_dec", load_sae, path)


def test_overflow_on_conversion(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file(_poke("W_dec", (1, 1), 1e6)(_good_tensors()), str(path), metadata={HEADER_KEY: json.dumps(_good_doc())})
    assert load_sae(path).W_dec[1, 1] == 1e6
    assert "float16" in _raises(CheckpointError, path, "W_dec", load_sae, path, dtype=torch.float16)


# -- atomic save -----------------------------------------------------------------------------
def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    old = _sae(seed=0)
    save_sae(old, path)
    before = path.read_bytes()

    def half_then_interrupt(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_sae(_sae(seed=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    _assert_same_sae(old, load_sae(path))


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_sae(_sae(seed=0), path)
    before = path.read_bytes()

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_sae(_sae(seed=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_killed_save_keeps_the_old_file(tmp_path):
    """A process killed in the middle of writing (no cleanup runs) leaves the old file."""
    path = tmp_path / "a.safetensors"
    old = _sae(seed=0)
    save_sae(old, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import safedig_kernels as sk
        from safedig_kernels import checkpoints as ckpt

        def write_half_and_die(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\\0" * 1000)
            os._exit(3)

        ckpt.save_file = write_half_and_die
        sk.save_sae(sk.random_sae({D}, {F}, {K}, seed=1), sys.argv[1])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    assert path.read_bytes() == before
    _assert_same_sae(old, load_sae(path))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "a.safetensors"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".a.safetensors.")  # only the temporary


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_save_keeps_permissions_of_replaced_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_sae(_sae(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o640)
    save_sae(_sae(seed=1), path)
    assert path.stat().st_mode & 0o777 == 0o640


# -- SAELens ---------------------------------------------------------------------------------
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


def _saelens_v3(**over) -> dict:
    """An older 3.x cfg: 'standard' architecture with the topk activation, bool normalisation,
    runner-style 'activation_fn' key and no version field."""
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
           "activation_fn": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "normalize_activations": False, "context_size": 128}
    return {**cfg, **over}


def _write_saelens(root: Path, cfg: dict, tensors: dict, scaler: Optional[dict] = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(root / "sae_weights.safetensors"))
    if scaler is not None:
        (root / "activation_scaler.json").write_text(json.dumps(scaler))
    return root


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


def _x(d: int = D, seed: int = 5) -> torch.Tensor:
    return 2.0 * torch.randn(N, d, generator=_gen(seed), dtype=torch.float64)


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


def _mut(key: str, value) -> Callable[[dict], dict]:
    return lambda d: _set(d, key, value)


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


# -- sparsify --------------------------------------------------------------------------------
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


# -- every format survives a trip through our own ---------------------------------------------
def test_foreign_formats_round_trip_through_ours(tmp_path):
    sl = load_sae(_write_saelens(tmp_path / "sl", _saelens_v6_training(apply_b_dec_to_input=False),
                                 _lib_weights()))
    sp = load_sae(_write_sparsify(tmp_path / "sp" / "layers.2", _sparsify_cfg(), _sparsify_weights()))
    for i, sae in enumerate((sl, sp)):
        sae.set_harmful([0, 9])
        save_sae(sae, tmp_path / f"{i}.safetensors")
        _assert_same_sae(sae, load_sae(tmp_path / f"{i}.safetensors"))


# -- detection and arguments -----------------------------------------------------------------
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


# -- fail closed: numbers beyond range, JSON nested too deeply, files that are not files ------------
HUGE = str(10 ** 400)                  # a JSON int beyond float (and 64-bit) range
DIGITS_5000 = "1" * 5000               # longer than Python converts (json.loads: bare ValueError)
DEEP = "[" * 100_000                   # json.loads: RecursionError
DEEPISH = "[" * 500 + "]" * 500        # parses, but breaks SAEMetadata copies and reprs later
needs_digit_limit = pytest.mark.skipif(not getattr(sys, "get_int_max_str_digits", lambda: 0)(),
                                       reason="no int digit limit before Python 3.11")


def _cases(table: list[tuple]) -> list:
    """pytest params from (id, *values, needle) rows; integer-length cases need Python 3.11+."""
    return [pytest.param(*c[1:], id=c[0], marks=needs_digit_limit if c[-1] == "integer too long" else ())
            for c in table]


def _with_literal(doc: dict, key: str, literal: str) -> str:
    """json.dumps(doc) with doc[key] written as the raw JSON `literal` (1e999 has no Python value
    that dumps as itself)."""
    return json.dumps(_set(doc, key, "@literal@")).replace('"@literal@"', literal)


def _raises_ckpt(specials, path: Path, key: Optional[str], fn: Callable, *args, **kwargs) -> str:
    """`_raises(CheckpointError, ...)`, run so that a reader blocked on a FIFO fails the test."""
    e = specials.call(fn, *args, **kwargs)
    assert isinstance(e, CheckpointError), f"expected CheckpointError, got {e!r}"
    assert (e.path, e.key) == (str(path), key), (e.path, e.key, str(e))
    assert str(path) in str(e) and (key is None or repr(key) in str(e)), str(e)
    return str(e)


@pytest.fixture
def specials():
    s = SpecialFiles()
    yield s
    s.close()


# (id, header key or None for the whole header, raw JSON, key the error names, words in it)
_OWN_HEADER_NUMBERS = [
    ("beta-1e999", "beta", "1e999", "beta", "must be finite"),
    ("gamma-minus-1e999", "gamma", "-1e999", "gamma", "must be finite"),
    ("tau-10e400-int", "tau", HUGE, "tau", "beyond the float range"),
    ("scale-10e400-int", "activation_scale", HUGE, "activation_scale", "beyond the float range"),
    ("k-10e400", "k", HUGE, "k", "64-bit integer"),
    ("k-2e63", "k", str(2 ** 63), "k", "64-bit integer"),
    ("version-10e400", "format_version", HUGE, "format_version", "newer"),
    ("harmful-10e400", "harmful_features", f"[1, {HUGE}]", "harmful_features", "[0, F)"),
    ("beta-5000-digits", "beta", DIGITS_5000, HEADER_KEY, "integer too long"),
    ("header-deep-100k", None, DEEP, HEADER_KEY, "nested too deeply"),
    ("extra-deep-500", "extra", '{"a": ' + DEEPISH + "}", HEADER_KEY, "nested too deeply"),
]


@pytest.mark.parametrize("field,literal,key,needle", _cases(_OWN_HEADER_NUMBERS))
def test_own_header_numbers_and_nesting(tmp_path, field, literal, key, needle):
    path = tmp_path / "bad.safetensors"
    header = literal if field is None else _with_literal(_good_doc(), field, literal)
    save_file(_good_tensors(), str(path), metadata={HEADER_KEY: header})
    for load in (load_sae, ckpt.read_safedig, TopKSAE.load):
        msg = _raises(CheckpointError, path, key, load, path)
        assert needle in msg and len(msg) < 1000, msg  # huge numbers are not printed out


# (id, cfg, file, key written, raw JSON, key the error names or None, words in it)
_FOREIGN_CFG_NUMBERS = [
    ("saelens-d_in-1e999", "saelens", "cfg.json", "d_in", "1e999", "d_in", "expected int"),
    ("saelens-d_in-10e400", "saelens", "cfg.json", "d_in", HUGE, "d_in", "64-bit integer"),
    ("saelens-d_sae-2e63", "saelens", "cfg.json", "d_sae", str(2 ** 63), "d_sae", "64-bit integer"),
    ("saelens-k-10e400", "saelens", "cfg.json", "k", HUGE, "k", "1 <= k <= F"),
    ("saelens-k-5000-digits", "saelens", "cfg.json", "k", DIGITS_5000, None, "integer too long"),
    ("saelens-cfg-deep", "saelens", "cfg.json", None, DEEP, None, "nested too deeply"),
    ("saelens-metadata-deep-500", "saelens", "cfg.json", "metadata", DEEPISH, None, "nested too deeply"),
    ("scaler-1e999", "scaler", "activation_scaler.json", "scaling_factor", "1e999", "scaling_factor",
     "positive and finite"),
    ("scaler-10e400-int", "scaler", "activation_scaler.json", "scaling_factor", HUGE, "scaling_factor",
     "beyond the float range"),
    ("scaler-deep", "scaler", "activation_scaler.json", None, DEEP, None, "nested too deeply"),
    ("sparsify-d_in-1e999", "sparsify", "cfg.json", "d_in", "1e999", "d_in", "expected int"),
    ("sparsify-num_latents-10e400", "sparsify", "cfg.json", "num_latents", HUGE, "num_latents", "64-bit integer"),
    ("sparsify-expansion-2e64", "sparsify", "cfg.json", "expansion_factor", str(2 ** 64), "expansion_factor",
     "64-bit integer"),
    ("sparsify-k-10e400", "sparsify", "cfg.json", "k", HUGE, "k", "64-bit integer"),
    ("sparsify-cfg-deep", "sparsify", "cfg.json", None, DEEP, None, "nested too deeply"),
]


def _foreign_dir(root: Path, fmt: str) -> tuple[Path, dict]:
    """A good SAELens (with an activation scaler for "scaler") or sparsify directory, and the
    JSON doc of its file that a test rewrites."""
    if fmt == "sparsify":
        return _write_sparsify(root, _sparsify_cfg(), _sparsify_weights()), _sparsify_cfg()
    if fmt == "scaler":
        cfg = _saelens_v6(normalize_activations="expected_average_only_in")
        return _write_saelens(root, cfg, _lib_weights(), {"scaling_factor": 2.0}), {"scaling_factor": 2.0}
    return _write_saelens(root, _saelens_v6(), _lib_weights()), _saelens_v6()


@pytest.mark.parametrize("fmt,filename,field,literal,key,needle", _cases(_FOREIGN_CFG_NUMBERS))
def test_foreign_cfg_numbers_and_nesting(tmp_path, fmt, filename, field, literal, key, needle):
    root, doc = _foreign_dir(tmp_path / "sae", fmt)
    (root / filename).write_text(literal if field is None else _with_literal(doc, field, literal))
    loader = load_sparsify if fmt == "sparsify" else load_saelens
    for load in (load_sae, loader):
        msg = _raises(CheckpointError, root / filename, key, load, root)
        assert needle in msg and len(msg) < 1000, msg


def test_activation_scale_argument_beyond_float_range(tmp_path):
    root = _write_saelens(tmp_path / "sl", _saelens_v6(), _lib_weights())
    with pytest.raises(ValueError, match="activation_scale must be a positive finite number, got an integer of 401"):
        load_sae(root, activation_scale=10 ** 400)


def test_save_refuses_what_the_reader_refuses(tmp_path):
    path = tmp_path / "a.safetensors"
    save_sae(_sae(), tmp_path / "src.safetensors")
    w = ckpt.read_sae(tmp_path / "src.safetensors")
    deep = json.loads(DEEPISH)
    for meta, needle in ((dataclasses.replace(w.metadata, extra={"a": deep}), "nested too deeply"),
                         (dataclasses.replace(w.metadata, beta=10 ** 400),
                          "beta must be a finite float, got an integer of 401 digits"),
                         (dataclasses.replace(w.metadata, beta=5.0), "beta must lie in [0, 1]"),
                         (dataclasses.replace(w.metadata, activation_scale=10 ** 400), "activation_scale")):
        with pytest.raises(ValueError, match="cannot save") as info:
            ckpt.write_safedig(path, dataclasses.replace(w, metadata=meta))
        assert needle in str(info.value)
        assert not path.exists()
    ok = dataclasses.replace(w.metadata, extra={"a": json.loads("[" * 98 + "]" * 98)})  # 99 levels: allowed
    ckpt.write_safedig(path, dataclasses.replace(w, metadata=ok))
    assert ckpt.read_safedig(path).metadata.extra == ok.extra


# Where a checkpoint reader meets a file: (id, layout, the file made special, loaders to call)
_READER_FILES = [
    ("safedig-file", "safedig", "ckpt.safetensors", ("load_sae", "read_safedig", "detect_format")),
    ("saelens-cfg", "saelens", "cfg.json", ("load_sae", "load_saelens")),
    ("saelens-weights", "saelens", "sae_weights.safetensors", ("load_sae", "load_saelens")),
    ("saelens-scaler", "scaler", "activation_scaler.json", ("load_sae", "load_saelens")),
    ("sparsify-cfg", "sparsify", "cfg.json", ("load_sae", "load_sparsify")),
    ("sparsify-weights", "sparsify", "sae.safetensors", ("load_sae", "load_sparsify")),
]
_LOADERS = {"load_sae": load_sae, "read_safedig": ckpt.read_safedig, "detect_format": detect_format,
            "load_saelens": load_saelens, "load_sparsify": load_sparsify}


@posix_only
@pytest.mark.parametrize("kind,words", SPECIAL_KINDS)
@pytest.mark.parametrize("layout,filename,loaders", [pytest.param(*c[1:], id=c[0]) for c in _READER_FILES])
def test_checkpoint_readers_refuse_special_files(tmp_path, specials, layout, filename, loaders, kind, words):
    root = tmp_path if layout == "safedig" else _foreign_dir(tmp_path / "sae", layout)[0]
    path = specials.make(kind, root / filename)
    for name in loaders:
        msg = _raises_ckpt(specials, path, None, _LOADERS[name], path if layout == "safedig" else root)
        if layout == "safedig" and kind == "directory":  # read as a (bad) SAELens/sparsify directory
            assert "directory" in msg, msg
        else:
            assert_not_regular(msg, words)


@posix_only
@pytest.mark.parametrize("loader", ["load_sae", "read_safedig", "detect_format"])
def test_dev_null_is_not_a_checkpoint(specials, loader):
    msg = _raises_ckpt(specials, Path(os.devnull), None, _LOADERS[loader], os.devnull)
    assert_not_regular(msg, "character device")


def test_missing_checkpoint_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file .*nope\.safetensors does not exist"):
        ckpt.read_safedig(tmp_path / "nope.safetensors")
    root = _write_saelens(tmp_path / "sl", _saelens_v6(), _lib_weights())
    (root / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"SAELens config .*cfg\.json does not exist"):
        load_saelens(root)


# -- the libraries' SAE objects in memory: the same rules as their directories -----------------
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
