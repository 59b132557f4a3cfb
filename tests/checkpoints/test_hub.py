"""SAEs through directories and the Hugging Face Hub: `TopKSAE.save_pretrained` / `from_pretrained`,
`hf://` names in steering configs.

No test reaches the network: Hub repos are built in a cache on disk (blobs, snapshot symlinks
and refs, as huggingface_hub writes them) and read with HF_HUB_OFFLINE=1; the Hub API calls
that would go online are replaced by ones that fail the test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from _checkpoints import (
    _assert_same_sae,
    _cache_repo,
    _files,
    _lib_weights,
    _sae,
    _saelens_v6,
    _sparsify_cfg,
    _sparsify_weights,
    _write_saelens,
    _write_sparsify,
)

from safedig_kernels import checkpoints as ckpt
from safedig_kernels.checkpoints import CheckpointError, detect_format, parse_hub_uri
from safedig_kernels.integrations.diffusers.config import SafeDIGConfig, SiteConfig
from safedig_kernels.integrations.diffusers.plan import check_sae_site
from safedig_kernels.sae import TopKSAE, load_saelens, load_sparsify

REPO = "safedig-test/flux-saes"


MAIN = "a" * 40  # commit hashes


V1 = "b" * 40


SUB = "single_transformer_blocks.9"


@pytest.fixture
def published(tmp_path, offline) -> dict[str, TopKSAE]:
    """REPO in the offline cache: main holds an SAE at the root, one in SUB, a sparsify
    hookpoint and a folder with no SAE; branch v1 (another commit) another root SAE."""
    saes = {"main": _sae(seed=0), "sub": _sae(seed=2, dtype=torch.bfloat16), "v1": _sae(seed=1)}
    saes["main"].save_pretrained(tmp_path / "up" / "main")
    saes["sub"].save_pretrained(tmp_path / "up" / "main" / SUB)
    _write_sparsify(tmp_path / "up" / "main" / "sparsify" / "transformer_blocks.12", _sparsify_cfg(),
                    _sparsify_weights())
    (tmp_path / "up" / "main" / "notes").mkdir()
    (tmp_path / "up" / "main" / "notes" / "README.md").write_text("no SAE here")
    saes["v1"].save_pretrained(tmp_path / "up" / "v1")
    _cache_repo(offline, REPO, {MAIN: _files(tmp_path / "up" / "main"), V1: _files(tmp_path / "up" / "v1")},
                {"main": MAIN, "v1": V1})
    return saes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_pretrained_round_trips_bit_exactly(tmp_path, dtype):
    sae = _sae(dtype=dtype)
    sae.set_harmful([1, 5, 40])
    sae.set_strengths(beta=0.3, gamma=1.25, tau=-0.5)
    written = sae.save_pretrained(tmp_path / "new" / "dir")
    folder = tmp_path / "new" / "dir"
    assert written == folder / ckpt.PRETRAINED_WEIGHTS and sorted(os.listdir(folder)) == [ckpt.PRETRAINED_WEIGHTS]
    assert detect_format(folder) == "safedig"
    for loaded in (TopKSAE.from_pretrained(folder), TopKSAE.from_pretrained(str(folder)), TopKSAE.load(folder)):
        _assert_same_sae(loaded, sae)  # weights bitwise, k, harmful set, strengths, every metadata field
        assert loaded.metadata.harmful_features == [1, 5, 40] and float(loaded.gamma) == 1.25
    # the file is this project's format itself
    _assert_same_sae(TopKSAE.load(written), sae)
    sae.set_harmful([0])
    sae.save_pretrained(folder)  # overwriting is fine
    assert TopKSAE.from_pretrained(folder).metadata.harmful_features == [0]


def test_from_pretrained_reads_local_directories_of_every_format(tmp_path):
    _sae(seed=4).save_pretrained(tmp_path / "repo" / SUB)
    _assert_same_sae(TopKSAE.from_pretrained(tmp_path / "repo", subfolder=SUB), _sae(seed=4))
    sl = _write_saelens(tmp_path / "saelens", _saelens_v6(), _lib_weights())
    _assert_same_sae(TopKSAE.from_pretrained(sl, dtype=torch.float64), load_saelens(sl, dtype=torch.float64))
    _write_sparsify(tmp_path / "run" / "transformer_blocks.12", _sparsify_cfg(), _sparsify_weights())
    sp = TopKSAE.from_pretrained(tmp_path / "run", subfolder="transformer_blocks.12", stream="text")
    _assert_same_sae(sp, load_sparsify(tmp_path / "run" / "transformer_blocks.12", stream="text"))
    assert (sp.metadata.site, sp.metadata.extra["stream"]) == ("transformer_blocks.12", "text")
    file = tmp_path / "one.safetensors"
    _sae(seed=5).save(file)
    _assert_same_sae(TopKSAE.from_pretrained(file), _sae(seed=5))
    with pytest.raises(CheckpointError, match="these subdirectories hold one SAE each.*transformer_blocks.12"):
        TopKSAE.from_pretrained(tmp_path / "run")


def test_pretrained_directories_refuse_ambiguity_and_bad_arguments(tmp_path):
    sp = _write_sparsify(tmp_path / "layers.2", _sparsify_cfg(), _sparsify_weights())
    with pytest.raises(CheckpointError, match="already holds sae.safetensors"):
        _sae().save_pretrained(sp)
    assert not (sp / ckpt.PRETRAINED_WEIGHTS).exists()
    _sae().save(sp / ckpt.PRETRAINED_WEIGHTS)  # put there by hand: which one is meant?
    with pytest.raises(CheckpointError, match="holds both safedig_sae.safetensors"):
        TopKSAE.from_pretrained(sp)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        _sae().save_pretrained(tmp_path / "file")
    saved = tmp_path / "saved"
    _sae().save_pretrained(saved)
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repos"):
        TopKSAE.from_pretrained(saved, revision="v1")
    with pytest.raises(FileNotFoundError, match="no such file or directory, and not a Hub repo id"):
        TopKSAE.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no such file or directory, and not a Hub repo id"):
        TopKSAE.from_pretrained("./missing")
    with pytest.raises(ValueError, match="subfolder must be a relative folder"):
        TopKSAE.from_pretrained(saved, subfolder="../saved")
    with pytest.raises(TypeError, match="repo_id_or_path must be a str"):
        TopKSAE.from_pretrained(3)
    with pytest.raises(ValueError, match="activation_scale applies to SAELens and sparsify"):
        TopKSAE.from_pretrained(saved, activation_scale=2.0)


@pytest.mark.parametrize("uri,want", [
    ("hf://owner/name", ("owner/name", None, None)),
    ("hf://owner/name/sub", ("owner/name", "sub", None)),
    ("hf://Owner-1/my.sae_2/a/b/@v1.0", ("Owner-1/my.sae_2", "a/b", "v1.0")),
    ("hf://owner/name@refs/pr/3", ("owner/name", None, "refs/pr/3")),
    ("hf://owner/name/single_transformer_blocks.9@" + "c" * 40, ("owner/name", SUB, "c" * 40)),
])
def test_hub_names_parse(uri, want):
    assert parse_hub_uri(uri) == want
    assert parse_hub_uri(ckpt.hub_uri(*want)) == want


@pytest.mark.parametrize("uri", ["hf://owner", "hf://owner/", "hf:///name", "hf://owner/name@", "hf://o/n/../x",
                                 "hf://o/n//x", "hf://o--x/n", "hf://o/n a", "hf://o/.n", "owner/name",
                                 "hf://o/n/x@ "])
def test_bad_hub_names_say_what_is_expected(uri):
    with pytest.raises(CheckpointError, match=r"hf://owner/name\[/subfolder\]\[@revision\]"):
        parse_hub_uri(uri)


def test_from_pretrained_reads_the_hub_cache_offline(published):
    _assert_same_sae(TopKSAE.from_pretrained(REPO), published["main"])
    _assert_same_sae(TopKSAE.from_pretrained(REPO, revision="main"), published["main"])
    _assert_same_sae(TopKSAE.from_pretrained(REPO, revision="v1"), published["v1"])
    _assert_same_sae(TopKSAE.from_pretrained(REPO, revision=V1), published["v1"])  # a commit
    _assert_same_sae(TopKSAE.from_pretrained(REPO, subfolder=SUB), published["sub"])
    assert TopKSAE.from_pretrained(REPO, subfolder=SUB).dtype == torch.bfloat16
    _assert_same_sae(TopKSAE.from_pretrained(f"hf://{REPO}/{SUB}@main"), published["sub"])
    _assert_same_sae(TopKSAE.from_pretrained(f"hf://{REPO}@v1", revision="v1"), published["v1"])
    sub = TopKSAE.from_pretrained(f"hf://{REPO}/{SUB}", dtype=torch.float32, device="cpu")
    assert sub.dtype == torch.float32 and torch.equal(sub.W_enc, published["sub"].W_enc.float())
    with pytest.raises(ValueError, match="revision='main' disagrees with the revision 'v1'"):
        TopKSAE.from_pretrained(f"hf://{REPO}@v1", revision="main")


def test_foreign_saes_on_the_hub_keep_their_rules(published, tmp_path):
    sp = TopKSAE.from_pretrained(REPO, subfolder="sparsify/transformer_blocks.12")
    _assert_same_sae(sp, load_sparsify(_write_sparsify(tmp_path / "transformer_blocks.12", _sparsify_cfg(),
                                                       _sparsify_weights())))
    assert sp.metadata.site == "transformer_blocks.12"  # the hookpoint folder, as sparsify names it


def test_a_sparsify_hookpoint_at_the_repo_root_gets_no_commit_hash_as_its_site(tmp_path, offline):
    root = _write_sparsify(tmp_path / "up" / "transformer_blocks.3", _sparsify_cfg(), _sparsify_weights())
    _cache_repo(offline, "owner/sparsify-tb3", {MAIN: _files(root)}, {"main": MAIN})
    assert TopKSAE.from_pretrained("owner/sparsify-tb3").metadata.site == ""
    told = TopKSAE.from_pretrained("owner/sparsify-tb3", site="transformer_blocks.3")
    assert (told.metadata.site, told.metadata.extra["stream"]) == ("transformer_blocks.3", "image")


def test_missing_repos_revisions_and_folders_are_named(published, offline):
    with pytest.raises(FileNotFoundError) as info:
        TopKSAE.from_pretrained("safedig-test/missing")
    msg = str(info.value)
    assert "'safedig-test/missing'" in msg and "HF_HUB_OFFLINE=1" in msg and str(offline) in msg, msg
    assert "nor is there a local path 'safedig-test/missing'" in msg, msg  # it may have been meant as one
    with pytest.raises(FileNotFoundError) as info:
        TopKSAE.from_pretrained("hf://safedig-test/missing")
    assert "'safedig-test/missing'" in str(info.value) and "local path" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=f"Hub repo '{REPO}' \\(revision 'v2'\\) is not in the local"):
        TopKSAE.from_pretrained(REPO, revision="v2")
    with pytest.raises(FileNotFoundError, match=f"hf://{REPO}/blocks.99: no SAE files that are in the local "
                                                f"cache \\(offline\\) in the repo's folder 'blocks.99'"):
        TopKSAE.from_pretrained(REPO, subfolder="blocks.99")
    with pytest.raises(CheckpointError, match=f"hf://{REPO}/notes: holds no SAE this package reads"):
        TopKSAE.from_pretrained(f"hf://{REPO}/notes")


def test_offline_is_read_from_the_environment_at_call_time(published, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported before HF_HUB_OFFLINE was set
    _assert_same_sae(TopKSAE.from_pretrained(REPO, subfolder=SUB), published["sub"])


def test_cache_dir_and_local_files_only_need_no_environment(published, offline, monkeypatch, tmp_path):
    from huggingface_hub import constants

    moved = tmp_path / "elsewhere"
    shutil.copytree(offline, moved, symlinks=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    sae = TopKSAE.from_pretrained(REPO, revision="v1", cache_dir=moved, local_files_only=True)
    _assert_same_sae(sae, published["v1"])
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        TopKSAE.from_pretrained(REPO, local_files_only=True)  # not in the default (empty) cache


def test_online_only_the_files_an_sae_is_made_of_are_fetched(tmp_path, monkeypatch):
    """Online, snapshot_download gets the repo, revision, cache, token and patterns that pick
    this folder's SAE files alone (filtered here by huggingface_hub's own filter)."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    remote = tmp_path / "remote"  # the repo as the Hub holds it
    _sae().save_pretrained(remote)
    _sae(seed=2).save_pretrained(remote / SUB)
    _sae(seed=3).save_pretrained(remote / SUB / "older")
    (remote / SUB / "activations.safetensors").write_bytes(b"not an SAE")
    fetched = []

    def snapshot_download(repo_id, **kwargs):
        assert (repo_id, kwargs["revision"], kwargs["local_files_only"], kwargs["token"]) == (REPO, "v1", False, "t")
        snapshot = Path(kwargs["cache_dir"]) / "snapshots" / V1
        for rel in filter_repo_objects(items=sorted(_files(remote)), allow_patterns=kwargs["allow_patterns"]):
            fetched.append(rel)
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(remote / rel, snapshot / rel)
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    sae = TopKSAE.from_pretrained(f"hf://{REPO}/{SUB}@v1", cache_dir=tmp_path / "cache", token="t")
    assert fetched == [f"{SUB}/{ckpt.PRETRAINED_WEIGHTS}"]
    _assert_same_sae(sae, _sae(seed=2))
    with pytest.raises(FileNotFoundError, match=r"no SAE files in the repo's folder 'nothing'"):
        TopKSAE.from_pretrained(REPO, subfolder="nothing", revision="v1", cache_dir=tmp_path / "cache", token="t")


def test_the_hub_needs_huggingface_hub_and_local_paths_do_not(tmp_path, monkeypatch):
    _sae().save_pretrained(tmp_path / "d")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub now fails
    for name in (REPO, f"hf://{REPO}/{SUB}"):
        with pytest.raises(ImportError, match=r"pip install 'safedig-kernels\[diffusers\]'"):
            TopKSAE.from_pretrained(name)
    _assert_same_sae(TopKSAE.from_pretrained(tmp_path / "d"), _sae())


def test_importing_the_library_never_imports_huggingface_hub():
    code = ("import sys, safedig_kernels, safedig_kernels.sae, safedig_kernels.checkpoints\n"
            "from safedig_kernels.integrations.diffusers.config import SafeDIGConfig\n"
            "assert 'huggingface_hub' not in sys.modules, sorted(m for m in sys.modules if 'hub' in m)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _config_doc(*saes: str) -> dict:
    return {"format": "safedig-diffusers", "version": 1,
            "sites": [{"site": f"single_transformer_blocks.{i}", "sae": sae} for i, sae in enumerate(saes)]}


def test_a_config_json_names_an_sae_on_the_hub(published, tmp_path):
    folder = tmp_path / "cfg"
    (folder / "saes").mkdir(parents=True)
    _sae(seed=7).save(folder / "saes" / "local.safetensors")
    uri = f"hf://{REPO}/{SUB}@main"
    path = folder / "steer.json"
    path.write_text(json.dumps(_config_doc(uri, "saes/local.safetensors", f"hf://{REPO}@v1", uri)))
    config = SafeDIGConfig.from_json(path)
    assert [s.sae for s in config.sites] == [uri, str(folder / "saes" / "local.safetensors"), f"hf://{REPO}@v1", uri]
    loaded = config.with_loaded_saes()
    _assert_same_sae(loaded.sites[0].sae, published["sub"])
    _assert_same_sae(loaded.sites[1].sae, _sae(seed=7))
    _assert_same_sae(loaded.sites[2].sae, published["v1"])
    assert loaded.sites[3].sae is loaded.sites[0].sae  # each SAE read once
    # written back: hf:// names as given, local paths relative to the new file's folder
    out = config.to_json(tmp_path / "other" / "steer.json")
    assert [s["sae"] for s in json.loads(out.read_text())["sites"]] == [
        uri, os.path.join("..", "cfg", "saes", "local.safetensors"), f"hf://{REPO}@v1", uri]
    _assert_same_sae(SafeDIGConfig.from_json(out).with_loaded_saes().sites[0].sae, published["sub"])


@pytest.mark.parametrize("sae,exc,needle", [
    ("hf://owner", ValueError, "expected hf://owner/name[/subfolder][@revision]"),
    ("hf://owner/name/../x", ValueError, "'.', '..' or empty parts"),
])
def test_a_config_json_with_a_bad_hub_name_names_file_and_site(tmp_path, sae, exc, needle):
    path = tmp_path / "steer.json"
    path.write_text(json.dumps(_config_doc(sae)))
    with pytest.raises(exc) as info:
        SafeDIGConfig.from_json(path)
    msg = str(info.value)
    assert str(path) in msg and "sites[0]" in msg and needle in msg, msg


def test_a_config_naming_a_missing_hub_sae_fails_before_any_model(published):
    config = SafeDIGConfig([SiteConfig(SUB, "hf://safedig-test/gone"), SiteConfig("x", f"hf://{REPO}/notes")])
    with pytest.raises(FileNotFoundError, match=r"SiteConfig\(site='single_transformer_blocks.9:image'\).sae: Hub repo "
                                                r"'safedig-test/gone'"):
        config.with_loaded_saes()
    with pytest.raises(ValueError, match=r"SiteConfig\(site='x:image'\).sae: 'hf://.*/notes' is not a valid SAE"):
        SafeDIGConfig([SiteConfig("x", f"hf://{REPO}/notes")]).with_loaded_saes()


def _sparsify_at(tmp_path: Path, module: str, stream: Optional[str]) -> TopKSAE:
    root = _write_sparsify(tmp_path / module, _sparsify_cfg(), _sparsify_weights())
    return load_sparsify(root, stream=stream)


def test_an_external_sae_told_its_site_is_refused_elsewhere(tmp_path):
    untold = _sparsify_at(tmp_path, "layers.6", None)  # a name of its own: not compared
    check_sae_site(untold, "transformer_blocks.3", "image", "here")
    told = _sparsify_at(tmp_path, "transformer_blocks.12", "image")
    check_sae_site(told, "transformer_blocks.12", "image", "here")
    for site, stream in (("transformer_blocks.3", "image"), ("transformer_blocks.12", "text")):
        with pytest.raises(ValueError, match="trained at site 'transformer_blocks.12:image'"):
            check_sae_site(told, site, stream, "here")
    check_sae_site(told, "transformer_blocks.3", "image", "here", allow=True)
