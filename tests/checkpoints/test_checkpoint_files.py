"""Every reader fails closed (safedig_kernels/checkpoints/_files.py, _checks.py): numbers beyond the
64-bit or float range and JSON nested too deeply are CheckpointErrors naming the key, a save
refuses what the reader would refuse, and a FIFO, device, socket or directory where a file belongs
is refused before it is opened (a FIFO would hang)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
from _checkpoints import (
    _good_doc,
    _good_tensors,
    _lib_weights,
    _raises,
    _sae,
    _saelens_v6,
    _set,
    _sparsify_cfg,
    _sparsify_weights,
    _write_saelens,
    _write_sparsify,
)
from safetensors.torch import save_file
from test_io import SPECIAL_KINDS, SpecialFiles, assert_not_regular, posix_only

from safedig_kernels import checkpoints as ckpt
from safedig_kernels.checkpoints import HEADER_KEY, CheckpointError, detect_format
from safedig_kernels.sae import TopKSAE, load_sae, load_saelens, load_sparsify, save_sae

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
