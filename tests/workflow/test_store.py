"""Activation store integrity: every entry carries a CRC32 of its tensor's stored bytes, every read
verifies it, and stores written before checksums existed stay readable."""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safedig_kernels.workflow.store import (
    MANIFEST,
    SHARD_META_KEY,
    ActivationStore,
    ActivationWriter,
    ManifestError,
    ShardError,
    SiteSpec,
    rebuild_manifest,
)

SITE = "single_transformer_blocks.0"


def _write(directory: Path, n_prompts: int = 3, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Three prompts of `[5, 8]` activations; one shard holds them all."""
    g = torch.Generator().manual_seed(0)
    want = {}
    w = ActivationWriter(directory, {"c": 1})
    for i in range(n_prompts):
        pid = f"p{i}"
        x = torch.randn(5, 8, generator=g).to(dtype)
        w.add(x, site=SiteSpec.parse(SITE), step=0, prompt_id=pid, label="safe")
        w.finish_prompt(pid, "safe")
        want[pid] = x
    w.close()
    return want


def _data_span(shard: Path, key: str) -> tuple[int, int]:
    """Absolute byte offsets [start, end) of tensor `key`'s data in a safetensors file: an 8-byte
    little-endian header length, the JSON header, then the data, which `data_offsets` index."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _flip_byte(shard: Path, key: str) -> None:
    start, end = _data_span(shard, key)
    raw = bytearray(shard.read_bytes())
    raw[(start + end) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def _strip_checksums(directory: Path) -> None:
    """Rewrite a store as one written before checksums existed: no `crc32` in the manifest's
    entries nor in any shard header."""
    m = json.loads((directory / MANIFEST).read_text())
    for s in m["shards"]:
        for e in s["entries"]:
            del e["crc32"]
        shard = directory / s["file"]
        with safe_open(str(shard), "pt") as f:
            header = json.loads(f.metadata()[SHARD_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for e in header["entries"]:
            del e["crc32"]
        save_file(tensors, str(shard), metadata={SHARD_META_KEY: json.dumps(header)})
    (directory / MANIFEST).write_text(json.dumps(m))


def test_entries_record_the_crc32_of_their_stored_bytes(tmp_path):
    want = _write(tmp_path, dtype=torch.bfloat16)
    m = json.loads((tmp_path / MANIFEST).read_text())
    (shard,) = m["shards"]
    path = tmp_path / shard["file"]
    raw = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()[SHARD_META_KEY])
    assert [e["crc32"] for e in header["entries"]] == [e["crc32"] for e in shard["entries"]]
    for e in shard["entries"]:
        start, end = _data_span(path, e["key"])
        assert e["crc32"] == zlib.crc32(raw[start:end])  # the bytes as stored in the file
    store = ActivationStore(tmp_path)
    assert all(e.crc32 is not None for e in store.entries())
    got = {e.prompt_id: t for e, t in store.iter_entries()}
    assert all(torch.equal(got[p], want[p]) for p in want)


def test_flipped_byte_in_a_shard_is_refused_on_every_read(tmp_path):
    _write(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    name = m["shards"][0]["file"]
    entry = m["shards"][0]["entries"][1]
    _flip_byte(tmp_path / name, entry["key"])

    store = ActivationStore(tmp_path)  # opening checks shapes and headers, not the data
    match = (rf"shard .*{name}, tensor '{entry['key']}' \(prompt 'p1', site {SITE}:image, step 0\): "
             r"checksum mismatch")
    with pytest.raises(ShardError, match=match):
        list(store.iter_entries())
    with pytest.raises(ShardError, match=match):
        list(store.iter_prompts(SITE))
    with pytest.raises(ShardError, match=match):
        store.load(SITE)
    with pytest.raises(ShardError, match=match):
        list(store.prompt_activations(SITE))
    with pytest.raises(ShardError, match=match):
        store.load(SITE, max_tokens=4)
    with pytest.raises(ShardError, match=match):
        list(store.stream(SITE).chunks())  # streaming for training reads through the same check
    # An undamaged entry read before the damaged one still reads.
    pid, _, x = next(store.iter_prompts(SITE))
    assert pid == "p0" and x.shape == (5, 8)


def test_store_without_checksums_stays_readable(tmp_path):
    want = _write(tmp_path)
    _strip_checksums(tmp_path)
    store = ActivationStore(tmp_path)
    assert all(e.crc32 is None for e in store.entries())
    got = {e.prompt_id: t for e, t in store.iter_entries()}
    assert all(torch.equal(got[p], want[p]) for p in want)
    assert store.load(SITE).shape == (15, 8)

    # rebuild_manifest from old-style shards writes old-style records, and they read back.
    (tmp_path / MANIFEST).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuild_manifest(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert all("crc32" not in e for s in m["shards"] for e in s["entries"])
    got = {e.prompt_id: t for e, t in ActivationStore(tmp_path).iter_entries()}
    assert all(torch.equal(got[p], want[p]) for p in want)

    # Resuming an old store: new shards carry checksums, old ones are read unverified.
    w = ActivationWriter(tmp_path, {"c": 1})
    w.add(torch.ones(2, 8), site=SiteSpec.parse(SITE), step=0, prompt_id="new", label="safe")
    w.finish_prompt("new", "safe")
    w.close()
    store = ActivationStore(tmp_path)
    crcs = {e.prompt_id: e.crc32 for e in store.entries()}
    assert crcs["new"] is not None and all(crcs[p] is None for p in want)
    assert torch.equal(dict((pid, x) for pid, _, x in store.iter_prompts(SITE))["new"], torch.ones(2, 8))


def test_rebuilt_manifest_keeps_checksums_and_verifies(tmp_path):
    _write(tmp_path)
    before = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).unlink()
    rebuild_manifest(tmp_path)
    after = json.loads((tmp_path / MANIFEST).read_text())
    assert [e["crc32"] for e in after["shards"][0]["entries"]] == [e["crc32"] for e in before["shards"][0]["entries"]]
    _flip_byte(tmp_path / after["shards"][0]["file"], "e0")
    with pytest.raises(ShardError, match=r"tensor 'e0' \(prompt 'p0'"):
        ActivationStore(tmp_path).load(SITE)


def test_adopted_orphan_shard_keeps_its_checksums(tmp_path, monkeypatch):
    from safedig_kernels.workflow import store as store_mod

    w = ActivationWriter(tmp_path, {"c": 1})
    real = store_mod.atomic_write_json

    def fail_manifest(path, obj):
        if Path(path).name == MANIFEST:
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(store_mod, "atomic_write_json", fail_manifest)
    w.add(torch.full((3, 4), 2.0), site=SiteSpec.parse(SITE), step=0, prompt_id="p", label="safe")
    w.finish_prompt("p", "safe")
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    monkeypatch.setattr(store_mod, "atomic_write_json", real)
    with pytest.warns(UserWarning, match="adopted 1 shard"):
        ActivationWriter(tmp_path, {"c": 1}).close()
    (e,) = ActivationStore(tmp_path).entries()
    assert e.crc32 == zlib.crc32(torch.full((3, 4), 2.0).numpy().tobytes())
    _flip_byte(tmp_path / e.shard, e.key)
    with pytest.raises(ShardError, match=rf"{e.shard}, tensor 'e0' \(prompt 'p'"):
        ActivationStore(tmp_path).load(SITE)


def test_manifest_and_shard_header_disagreeing_on_a_checksum(tmp_path):
    _write(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["shards"][0]["entries"][2]["crc32"] ^= 1
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"tensor 'e2' \(prompt 'p2'.*the manifest records crc32 .*the shard header"):
        ActivationStore(tmp_path)


def test_a_checksum_deleted_from_the_manifest_is_refused(tmp_path):
    # the shard header still records it: an edit must not turn verification off
    _write(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    del m["shards"][0]["entries"][1]["crc32"]
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"tensor 'e1' \(prompt 'p1'.*header records a crc32 but the manifest"):
        ActivationStore(tmp_path)


@pytest.mark.parametrize("bad", ["abc", -1, 1 << 32, 1.5, True])
def test_malformed_checksum_in_the_manifest(tmp_path, bad):
    _write(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["shards"][0]["entries"][0]["crc32"] = bad
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"entry 'e0' of shard-000000\.safetensors: 'crc32' must be an unsigned"):
        ActivationStore(tmp_path)
