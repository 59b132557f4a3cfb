"""Capture: round trip against the pipeline's own activations, subsampling, interruption and
resume, and bad inputs that must fail clearly without touching captured data."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from safedig_kernels.workflow import store as store_mod
from safedig_kernels.workflow.capture import CaptureConfig, capture
from safedig_kernels.workflow.prompts import PromptRecord, load_prompts
from safedig_kernels.workflow.store import (
    ActivationStore,
    ActivationWriter,
    ManifestError,
    ShardError,
    SiteSpec,
    rebuild_manifest,
)
from safedig_kernels.workflow.synthetic import tiny_flux_pipeline, write_synthetic_prompts

SITES = ["single_transformer_blocks.0", "transformer_blocks.1:text"]


def _config(**kw) -> CaptureConfig:
    base = dict(sites=SITES, steps=[0, 2], num_inference_steps=3, height=32, width=32)
    base.update(kw)
    return CaptureConfig(**base)


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*"))}


def _contents(store: ActivationStore) -> dict[tuple, torch.Tensor]:
    out = {}
    for e, t in store.iter_entries():
        key = (e.prompt_id, e.site_key, e.step, e.call)
        assert key not in out
        out[key] = t
    return out


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return write_synthetic_prompts(tmp_path_factory.mktemp("prompts"), {"safe": 3, "unsafe/nudity": 3}, seed=0)


@pytest.fixture(scope="module")
def reference(pipe, prompt_file, tmp_path_factory) -> Path:
    """An uninterrupted capture of every prompt."""
    out = tmp_path_factory.mktemp("ref") / "acts"
    capture(pipe, prompt_file, out, _config(), progress=False)
    return out


def test_round_trip_matches_pipeline_activations(pipe, prompt_file, reference):
    store = ActivationStore(reference)
    prompts = load_prompts(prompt_file)
    assert store.prompts == {p.id: p.label for p in prompts}
    assert store.sites == ["single_transformer_blocks.0:image", "transformer_blocks.1:text"]
    got = _contents(store)
    assert set(got) == {(p.id, s, step, 0) for p in prompts for s in store.sites for step in (0, 2)}
    assert all(t.shape == (64, 32) for k, t in got.items() if k[1].endswith("image"))
    assert all(t.shape == (8, 32) for k, t in got.items() if k[1].endswith("text"))

    # Record the same prompt independently with a hook of our own and compare bitwise.
    p = prompts[4]
    seen = []
    h = pipe.transformer.single_transformer_blocks[0].register_forward_hook(
        lambda m, a, o: seen.append(o[1].detach().clone()))
    try:
        emb = p.load_embeddings()
        pipe(**emb, num_inference_steps=3, height=32, width=32, guidance_scale=3.5, output_type="latent",
             generator=torch.Generator().manual_seed(0 + p.index))
    finally:
        h.remove()
    assert len(seen) == 3
    for step in (0, 2):
        torch.testing.assert_close(got[(p.id, "single_transformer_blocks.0:image", step, 0)], seen[step][0],
                                   rtol=0, atol=0)
    steps = sorted((e.step, e.timestep) for e in store.entries("single_transformer_blocks.0", labels=p.label)
                   if e.prompt_id == p.id)
    assert steps[0][1] > steps[1][1]  # timesteps fall along the schedule

    x = store.load("single_transformer_blocks.0", labels="unsafe")
    assert x.shape == (3 * 2 * 64, 32)
    assert store.load("single_transformer_blocks.0", max_tokens=100).shape == (100, 32)
    by_prompt = {pid: (lbl, t.shape) for pid, lbl, t in store.iter_prompts("transformer_blocks.1:text", "safe")}
    assert by_prompt == {q.id: ("safe", torch.Size([16, 32])) for q in prompts if q.label == "safe"}


def test_hooks_removed_and_progress_config_restored(pipe, prompt_file, tmp_path):
    before = _hooks(pipe.transformer)
    pipe.set_progress_bar_config(desc="mine")
    try:
        capture(pipe, prompt_file, tmp_path / "a", _config(steps=[0]), progress=False)
        assert pipe._progress_bar_config == {"desc": "mine"}
    finally:
        del pipe._progress_bar_config
    assert _hooks(pipe.transformer) == before


def test_token_subsampling(pipe, prompt_file, reference, tmp_path):
    store = ActivationStore(capture(pipe, prompt_file, tmp_path / "sub", _config(max_tokens=10, token_stride=2),
                                    progress=False).dir)
    ref = _contents(ActivationStore(reference))
    for e, t in store.iter_entries("single_transformer_blocks.0"):
        assert t.shape == (10, 32) and e.tokens_total == 64
        strided = ref[(e.prompt_id, e.site_key, e.step, e.call)][::2]
        # every kept row is one of the strided rows, and no row is kept twice
        match = (t[:, None, :] == strided[None, :, :]).all(-1)
        assert (match.sum(1) == 1).all()
    for e, t in store.iter_entries("transformer_blocks.1:text"):
        assert t.shape == (4, 32)  # 8 text tokens, every second one, fewer than max_tokens


def test_interrupt_and_resume_no_duplicates_no_losses(pipe, prompt_file, reference, tmp_path):
    out = tmp_path / "acts"
    calls = {"n": 0}

    def crash(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 2:  # fourth prompt, second step
            raise RuntimeError("simulated crash")

    before = _hooks(pipe.transformer)
    h = pipe.transformer.register_forward_pre_hook(crash, with_kwargs=True)
    try:
        # ~one tensor per shard, so shards are also flushed in the middle of a prompt
        with pytest.raises(RuntimeError, match="simulated crash"):
            capture(pipe, prompt_file, out, _config(shard_bytes=4096), progress=False)
    finally:
        h.remove()
    assert _hooks(pipe.transformer) == before

    partial = ActivationStore(out)
    first_ids = [p.id for p in load_prompts(prompt_file)][:3]
    assert sorted(partial.prompts) == sorted(first_ids)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = [e for s in manifest["shards"] for e in s["entries"]]
    assert any(e["prompt_id"] not in partial.prompts for e in listed), "the crash should leave a partial prompt"
    shards_before = _digest(out)

    store = capture(pipe, prompt_file, out, _config(shard_bytes=4096), progress=False)
    for name, digest in shards_before.items():  # nothing written before the crash was touched
        assert _digest(out)[name] == digest
    got, ref = _contents(store), _contents(ActivationStore(reference))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k

    # A third run has nothing left to do and writes nothing.
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    capture(pipe, prompt_file, out, _config(shard_bytes=4096), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_shard_written_but_not_indexed_is_adopted(tmp_path, monkeypatch):
    x = torch.randn(4, 8)
    w = ActivationWriter(tmp_path, {"c": 1})
    w.add(x, site=SiteSpec.parse("b.0"), step=0, prompt_id="p0", label="safe")
    w.finish_prompt("p0", "safe")
    w.flush()
    real = store_mod.atomic_write_json

    def fail_manifest(path, obj):
        if Path(path).name == "manifest.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(store_mod, "atomic_write_json", fail_manifest)
    w.add(x + 1, site=SiteSpec.parse("b.0"), step=0, prompt_id="p1", label="safe")
    w.finish_prompt("p1", "safe")
    with pytest.raises(OSError, match="disk full"):
        w.flush()  # the shard is on disk, the manifest does not list it
    monkeypatch.setattr(store_mod, "atomic_write_json", real)

    with pytest.warns(UserWarning, match="adopted 1 shard"):
        w2 = ActivationWriter(tmp_path, {"c": 1})
    assert w2.completed == {"p0": "safe", "p1": "safe"}
    w2.close()
    got = {e.prompt_id: t for e, t in ActivationStore(tmp_path).iter_entries()}
    assert torch.equal(got["p1"], x + 1) and torch.equal(got["p0"], x)


def test_empty_prompt_file(pipe, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no prompts"):
        capture(pipe, f, tmp_path / "out", _config(), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "label": "nsfw", "prompt": "x"}', r"line 1: label must be 'safe' or 'unsafe/<category>'"),
    ('{"id": "a", "label": "safe"}', r"line 1: needs 'embeddings'"),
    ('{"id": "a", "label": "safe", "embeddings": "nope.safetensors"}', r"line 1: embeddings file .*nope"),
    ('[1, 2]', r"line 1: expected a JSON object"),
    ('{"id": "a", "label": "safe", "prompt": "x"}\n{"id": "a", "label": "safe", "prompt": "y"}',
     r"line 2: id 'a' is already used on line 1"),
])
def test_bad_prompt_lines(tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_prompts(f)


def test_unknown_site_fails_before_anything_runs(pipe, prompt_file, tmp_path):
    with pytest.raises(ValueError, match=r"unknown site 'single_transformer_blocks\.9:image'.*"
                                         r"single_transformer_blocks\.0\.\.1"):
        capture(pipe, prompt_file, tmp_path / "out", _config(sites=["single_transformer_blocks.9"]), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="stream must be one of"):
        capture(pipe, prompt_file, tmp_path / "out", _config(sites=["transformer_blocks.0:video"]), progress=False)


def test_resume_with_other_settings_changes_nothing(pipe, prompt_file, reference, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"other settings \(steps: \[0, 2\] vs \[0\]\)"):
        capture(pipe, prompt_file, out, _config(steps=[0]), progress=False)
    with pytest.raises(FileExistsError, match="already holds a capture"):
        capture(pipe, prompt_file, out, _config(), resume=False, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_corrupt_manifest_is_reported_and_rebuilt_from_shards(pipe, prompt_file, reference, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    want = _contents(ActivationStore(out))
    shards = _digest(out)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON.*rebuild_manifest"):
        ActivationStore(out)
    with pytest.raises(ManifestError, match="not valid JSON"):
        capture(pipe, prompt_file, out, _config(), progress=False)
    assert _digest(out) == shards
    rebuild_manifest(out)
    assert (out / "manifest.json.corrupt").read_text() == text[: len(text) // 2]
    got = _contents(ActivationStore(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_mismatched_and_missing_shards(reference, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    name = manifest["shards"][0]["file"]
    # Another capture's shard under the same name: same keys, wrong shapes.
    from safetensors.torch import save_file
    keys = [e["key"] for e in manifest["shards"][0]["entries"]]
    header = json.dumps({"run": manifest["shards"][0]["run"], "entries": [], "completed": {}})
    save_file({k: torch.zeros(3, 5) for k in keys}, str(out / name), metadata={"safedig_activations": header})
    with pytest.raises(ShardError,
                       match=rf"{name}, tensor 'e0': the manifest says shape \[(64|8), 32\].*shape \[3, 5\]"):
        ActivationStore(out)
    (out / name).unlink()
    with pytest.raises(ShardError, match=rf"{name} listed in .* is missing"):
        ActivationStore(out)


def test_writer_refuses_shards_without_manifest(tmp_path):
    w = ActivationWriter(tmp_path, {"c": 1})
    w.add(torch.ones(2, 3), site=SiteSpec.parse("b.0"), step=0, prompt_id="p", label="safe")
    w.finish_prompt("p", "safe")
    w.close()
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="1 shard files but no manifest.json"):
        ActivationWriter(tmp_path, {"c": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuild_manifest(tmp_path)
    assert ActivationStore(tmp_path).prompts == {"p": "safe"}


# -- the CFG halves: steering's words (integrations/diffusers/config.py CFG_MODES) -------------------
def _sd3_prompts(directory: Path) -> list[PromptRecord]:
    """Two prompts with SD3 embeddings of the tiny SD3 in tests/_pipelines.py, negatives included."""
    from _pipelines import EMB
    from safetensors.torch import save_file

    records = []
    for i in range(2):
        path = directory / f"p{i}.safetensors"
        save_file({k: (v[0] + i).contiguous() for k, v in EMB.items()}, str(path))
        records.append(PromptRecord(id=f"p{i}", label="safe", index=i, embeddings=path))
    return records


def test_cfg_both_keeps_every_row_and_cond_the_conditional_half(tmp_path):
    # SD3 with guidance batches [uncond; cond]: "both" records both rows of every call, "cond"
    # exactly the second row, as a steering site's cfg="both" / "cond" steers them.
    from _pipelines import sd3_pipe

    pipe, prompts = sd3_pipe(), _sd3_prompts(tmp_path)
    config = dict(sites=["transformer_blocks.0"], steps=[0, 1], num_inference_steps=2, height=8, width=8,
                  guidance_scale=5.0)
    both = _contents(capture(pipe, prompts, tmp_path / "both", CaptureConfig(cfg="both", **config), progress=False))
    cond = _contents(capture(pipe, prompts, tmp_path / "cond", CaptureConfig(cfg="cond", **config), progress=False))
    assert both.keys() == cond.keys() and len(both) == 2 * 2
    for key, rows in both.items():
        tokens = rows.shape[0] // 2  # 8 x 8 latents, patch 1: 64 tokens per image
        assert tokens == 64 and torch.equal(cond[key], rows[tokens:])
        assert not torch.equal(rows[:tokens], rows[tokens:])  # the uncond row is another activation
    assert ActivationStore(tmp_path / "both").config["cfg"] == "both"


@pytest.mark.parametrize("cfg", ["all", "uncond", None])
def test_cfg_takes_steerings_words_only(cfg):
    with pytest.raises(ValueError, match=r"cfg must be 'cond' \(the conditional branch only\) or 'both'"):
        _config(cfg=cfg).validate()


def _record_cfg_as_old_stores_did(out: Path) -> None:
    """Rewrite a store's manifest and every shard header with cfg "all", as captures written
    before capture took steering's words recorded "both"."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["cfg"] = "all"
    (out / "manifest.json").write_text(json.dumps(manifest))
    for shard in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta[store_mod.SHARD_META_KEY])
        header["config"]["cfg"] = "all"
        save_file(tensors, str(shard), metadata={store_mod.SHARD_META_KEY: json.dumps(header)})


def test_a_store_recorded_with_cfg_all_reads_as_both(pipe, prompt_file, tmp_path):
    out = tmp_path / "acts"
    records = load_prompts(prompt_file)
    capture(pipe, records[:2], out, _config(cfg="both", steps=[0]), progress=False)
    _record_cfg_as_old_stores_did(out)
    assert '"cfg": "all"' in (out / "manifest.json").read_text()
    want = _contents(ActivationStore(out))
    assert ActivationStore(out).config["cfg"] == "both"
    with pytest.raises(ValueError, match=r"other settings \(cfg: 'both' vs 'cond'\)"):
        capture(pipe, records, out, _config(cfg="cond", steps=[0]), progress=False)
    # a resume with today's word continues it: the old prompts are kept, the rest are added
    store = capture(pipe, records, out, _config(cfg="both", steps=[0]), progress=False)
    got = _contents(store)
    assert sorted(store.prompts) == sorted(r.id for r in records)
    assert all(torch.equal(got[k], want[k]) for k in want)
    (out / "manifest.json").unlink()  # old shards ("all") and new ones ("both") are one capture
    rebuild_manifest(out)
    assert ActivationStore(out).config["cfg"] == "both" and _contents(ActivationStore(out)).keys() == got.keys()
