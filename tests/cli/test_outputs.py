"""No `safedig` command overwrites one of its inputs or writes into an activation store: every
collision is refused before any work with a one-line error naming both options and the path,
and the input is byte for byte what it was."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from _workflow import write_store

from safedig_kernels import random_sae
from safedig_kernels.cli import main
from safedig_kernels.cli._options import check_paths

SITE = "transformer_blocks.0"
D = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A capture (two prompts), an SAE, a prompt file and a steering config, read-only inputs."""
    from safedig_kernels.workflow.synthetic import write_synthetic_prompts

    d = tmp_path_factory.mktemp("outputs")
    g = torch.Generator().manual_seed(0)
    write_store(d / "acts", {"s0": ("safe", {SITE: torch.randn(6, D, generator=g)}),
                             "u0": ("unsafe/x", {SITE: torch.randn(6, D, generator=g)})})
    random_sae(D, 16, 2, seed=0).save(d / "sae.safetensors")
    write_synthetic_prompts(d / "prompts", {"safe": 1})
    (d / "steer.json").write_text(json.dumps({"format": "safedig-diffusers", "version": 1,
                                              "sites": [{"site": SITE, "sae": "sae.safetensors"}]}))
    return d


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A private copy of the inputs for one test."""
    shutil.copytree(base, tmp_path / "ws")
    return tmp_path / "ws"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(ws: Path, argv: list[str], phrases: list[str], capsys, absent: tuple[Path, ...] = ()) -> str:
    before = _digest(ws)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"safedig {argv[0]}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    missing = [p for p in phrases if p not in err]
    assert not missing, (missing, err)
    assert _digest(ws) == before  # every input unchanged, nothing written among them
    for p in absent:
        assert not p.exists(), p
    return err


def _score(ws: Path, **kw) -> list[str]:
    args = {"--activations": ws / "acts", "--site": SITE, "--sae": ws / "sae.safetensors", "--unsafe": "unsafe",
            "--report": ws / "out" / "score.json", **kw}
    return ["score"] + [str(x) for kv in args.items() for x in kv]


def _route(ws: Path, **kw) -> list[str]:
    args = {"--activations": ws / "acts", "--sae": f"{SITE}={ws / 'sae.safetensors'}", "--source": "unsafe",
            "--target": "unsafe", "--report": ws / "out" / "route.json", "--config": ws / "out" / "steer.json", **kw}
    return ["route"] + [str(x) for kv in args.items() for x in kv]


def _adapt(ws: Path, **kw) -> list[str]:
    args = {"--activations": ws / "acts", "--site": SITE, "--sae": ws / "sae.safetensors", "--target": "unsafe",
            "--replay": "0", "--out": ws / "out" / "adapted.safetensors", **kw}
    return ["adapt"] + [str(x) for kv in args.items() for x in kv] + ["--no-progress"]


def _train(ws: Path, **kw) -> list[str]:
    args = {"--activations": ws / "acts", "--site": SITE, "--features": "16", "--k": "2", "--steps": "2",
            "--batch-size": "4", "--out": ws / "out" / "sae.safetensors", **kw}
    return ["train"] + [str(x) for kv in args.items() for x in kv] + ["--no-progress", "--device", "cpu"]


def _capture(ws: Path, **kw) -> list[str]:
    args = {"--prompts": ws / "prompts" / "prompts.jsonl", "--sites": SITE, "--out": ws / "out" / "acts", **kw}
    return ["capture"] + [str(x) for kv in args.items() for x in kv] + ["--no-progress", "--device", "cpu"]


def _steer(ws: Path, **kw) -> list[str]:
    args = {"--config": ws / "steer.json", "--prompts": ws / "prompts" / "prompts.jsonl", "--out": ws / "steered", **kw}
    return ["steer"] + [str(x) for kv in args.items() for x in kv] + ["--no-progress", "--device", "cpu"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_output_onto_a_fifo_is_refused(ws, capsys):
    fifo = ws / "out" / "score.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    _refused(ws, _score(ws, **{"--report": fifo}), ["--report", "not a regular file"], capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# -- score ---------------------------------------------------------------------------------

def test_score_report_onto_the_sae(ws, capsys):
    sae = ws / "sae.safetensors"
    _refused(ws, _score(ws, **{"--report": sae}), ["--report", "--sae", str(sae), "same path"], capsys)


def test_score_report_table_onto_the_sae(ws, capsys):
    # `--report X.json` also writes X.txt: an SAE stored as X.txt is an input it would destroy.
    sae = ws / "model.txt"
    shutil.copy(ws / "sae.safetensors", sae)
    _refused(ws, _score(ws, **{"--sae": sae, "--report": ws / "model.json"}),
             ["--report's table", "--sae", str(sae)], capsys, absent=(ws / "model.json",))


def test_score_report_through_a_symlink_to_the_sae(ws, capsys):
    link = ws / "link.json"
    os.symlink(ws / "sae.safetensors", link)
    _refused(ws, _score(ws, **{"--report": link}), ["--report", "--sae", str(link)], capsys)


def test_score_out_sae_onto_the_sae(ws, capsys):
    sae = ws / "sae.safetensors"
    _refused(ws, _score(ws, **{"--out-sae": sae}), ["--out-sae", "--sae", str(sae)], capsys,
             absent=(ws / "out",))


def test_score_report_inside_the_store(ws, capsys):
    report = ws / "acts" / "score.json"
    _refused(ws, _score(ws, **{"--report": report}),
             ["--report", str(report), "activation store", "--activations"], capsys, absent=(report,))


# -- route ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--config", "--report"])
def test_route_outputs_onto_the_sae(ws, capsys, option):
    sae = ws / "sae.safetensors"
    _refused(ws, _route(ws, **{option: sae}), [option, f"--sae ({SITE})", str(sae)], capsys)


def test_route_config_inside_the_store(ws, capsys):
    cfg = ws / "acts" / "steer.json"
    _refused(ws, _route(ws, **{"--config": cfg}), ["--config", str(cfg), "activation store", "--activations"], capsys)


def test_route_config_onto_its_own_report_table(ws, capsys):
    out = ws / "out"
    _refused(ws, _route(ws, **{"--report": out / "r.json", "--config": out / "r.txt"}),
             ["--report's table", "--config", str(out / "r.txt")], capsys, absent=(out,))


# -- adapt ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--out", "--metrics"])
def test_adapt_outputs_onto_the_sae(ws, capsys, option):
    sae = ws / "sae.safetensors"
    _refused(ws, _adapt(ws, **{option: sae}), [option, "--sae", str(sae)], capsys)


def test_adapt_out_inside_the_store(ws, capsys):
    out = ws / "acts" / "adapted.safetensors"
    _refused(ws, _adapt(ws, **{"--out": out}), ["--out", str(out), "activation store", "--activations"], capsys)


# -- train ---------------------------------------------------------------------------------

def test_train_out_onto_a_shard(ws, capsys):
    shard = ws / "acts" / "shard-000000.safetensors"
    assert shard.is_file()
    _refused(ws, _train(ws, **{"--out": shard}), ["--out", str(shard), "activation store", "--activations"], capsys)


def test_train_metrics_onto_the_manifest(ws, capsys):
    manifest = ws / "acts" / "manifest.json"
    _refused(ws, _train(ws, **{"--metrics": manifest}), ["--metrics", str(manifest), "activation store"], capsys)


def test_train_checkpoint_dir_is_the_store(ws, capsys):
    acts = ws / "acts"
    _refused(ws, _train(ws, **{"--checkpoint-dir": acts}), ["--checkpoint-dir", "--activations", str(acts)], capsys)


def test_train_checkpoint_dir_inside_the_store(ws, capsys):
    ckpt = ws / "acts" / "ckpt"
    _refused(ws, _train(ws, **{"--checkpoint-dir": ckpt}), ["--checkpoint-dir", str(ckpt), "activation store"],
             capsys, absent=(ckpt,))


def test_train_out_and_metrics_the_same_file(ws, capsys):
    out = ws / "out" / "x.safetensors"
    _refused(ws, _train(ws, **{"--out": out, "--metrics": out}), ["--out", "--metrics", str(out)], capsys,
             absent=(ws / "out",))


# -- capture -------------------------------------------------------------------------------

def test_capture_into_another_store(ws, capsys):
    out = ws / "acts" / "sub"
    _refused(ws, _capture(ws, **{"--out": out}), ["--out", str(out), "inside the activation store"], capsys,
             absent=(out,))


def test_capture_out_onto_the_prompt_file(ws, capsys):
    prompts = ws / "prompts" / "prompts.jsonl"
    _refused(ws, _capture(ws, **{"--out": prompts}), ["--prompts", "--out", str(prompts)], capsys)


def test_capture_prompts_are_the_store_manifest(ws, capsys):
    manifest = ws / "acts" / "manifest.json"
    _refused(ws, _capture(ws, **{"--prompts": manifest, "--out": ws / "acts"}), ["--prompts", "--out", str(manifest)],
             capsys)


# -- steer ---------------------------------------------------------------------------------

def test_steer_report_onto_the_config(ws, capsys):
    out = ws / "steered"
    out.mkdir()
    cfg = out / "report.json"
    shutil.copy(ws / "steer.json", cfg)
    (out / "sae.safetensors").symlink_to(ws / "sae.safetensors")
    _refused(ws, _steer(ws, **{"--config": cfg, "--out": out}), ["--out", "--config", str(cfg)], capsys,
             absent=(out / "grid.png", out / "images"))


def test_steer_out_inside_the_store(ws, capsys):
    out = ws / "acts" / "steered"
    _refused(ws, _steer(ws, **{"--out": out}), ["--out", str(out / "report.json"), "activation store"], capsys,
             absent=(out,))


def test_steer_sae_inside_the_images_folder(ws, capsys):
    out = ws / "steered"
    (out / "images").mkdir(parents=True)
    sae = out / "images" / "sae.safetensors"
    shutil.copy(ws / "sae.safetensors", sae)
    cfg = ws / "steer-images.json"
    doc = {"format": "safedig-diffusers", "version": 1, "sites": [{"site": SITE, "sae": str(sae)}]}
    cfg.write_text(json.dumps(doc))
    _refused(ws, _steer(ws, **{"--config": cfg, "--out": out}), ["--out", str(sae), "SAE"], capsys,
             absent=(out / "report.json",))


# -- the helper itself ---------------------------------------------------------------------

def test_check_paths_allows_what_overwrites_nothing(ws):
    acts = ws / "acts"
    # Resuming a capture whose prompt file sits in the capture folder writes only the capture's own files.
    check_paths(inputs=[("--prompts", acts / "prompts.jsonl")], store=("--out", acts))
    # Outputs next to the store, not in it; missing outputs; options left unset.
    check_paths(inputs=[("--activations", acts), ("--sae", ws / "sae.safetensors")],
                outputs=[("--report", ws / "r.json"), ("--report's table", ws / "r.txt"), ("--out-sae", None)],
                folders=[("--checkpoint-dir", ws / "ckpt")])
    # A folder named like a store's that holds no capture manifest is no store.
    (ws / "plain").mkdir()
    (ws / "plain" / "manifest.json").write_text('{"something": "else"}')
    check_paths(outputs=[("--out", ws / "plain" / "x.safetensors")])


def test_check_paths_sees_hard_links(ws):
    link = ws / "hard.json"
    os.link(ws / "sae.safetensors", link)
    with pytest.raises(ValueError, match=r"--report .*hard\.json is the same path as --sae"):
        check_paths(inputs=[("--sae", ws / "sae.safetensors")], outputs=[("--report", link)])
