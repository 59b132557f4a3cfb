"""This project's format (safedig_kernels/checkpoints/safedig.py).

- bitwise round trips in bf16/fp16/fp32, dtype/device conversion on load;
- every bad file raises a CheckpointError (ValueError) naming the file and the key;
- an interrupted, failed or killed save leaves the earlier file intact.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _checkpoints import (
    _NO_CHANGE,
    REPO_ROOT,
    WEIGHTS,
    D,
    F,
    K,
    _assert_same_sae,
    _drop,
    _good_doc,
    _good_tensors,
    _lib_weights,
    _poke,
    _raises,
    _sae,
    _saelens_v6,
    _set,
    _write_saelens,
)
from safetensors.torch import save_file

from safedig_kernels.checkpoints import HEADER_KEY, CheckpointDtypeError, CheckpointError
from safedig_kernels.checkpoints import safedig as safedig_format
from safedig_kernels.sae import FORMAT_VERSION, TopKSAE, load_sae, save_sae

LOWP = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.float32, id="fp32")]


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

    monkeypatch.setattr(safedig_format, "save_file", half_then_interrupt)
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

    monkeypatch.setattr(os, "replace", refuse)
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
        from safedig_kernels.checkpoints import safedig as safedig_format

        def write_half_and_die(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\\0" * 1000)
            os._exit(3)

        safedig_format.save_file = write_half_and_die
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
