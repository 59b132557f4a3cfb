"""`safedig steer` on the CPU: help, a steer run from a routed config, its fail-closed errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safedig_kernels.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

SITES = ["transformer_blocks.0:text", "transformer_blocks.1:text"]
STEPS = 2
HW = 16


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A steering config written by `safedig route` for the tiny FLUX, its gate thresholds set
    on the safe tokens (as the demo does), and a held-out prompt file to steer."""
    from safedig_kernels.sae import TopKSAE
    from safedig_kernels.workflow.capture import CaptureConfig, capture
    from safedig_kernels.workflow.demo import safe_tau
    from safedig_kernels.workflow.pipelines import load_pipeline
    from safedig_kernels.workflow.prompts import load_prompts
    from safedig_kernels.workflow.synthetic import write_synthetic_prompts
    from safedig_kernels.workflow.train import TrainConfig, train_sae

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("routed")
    everything = write_synthetic_prompts(d, {"safe": 9, "unsafe/nudity": 9, "unsafe/violence": 3}, seed=0,
                                         strength=8.0, text_tokens=32)
    lines = _lines(everything)
    held = {"safe": 3, "unsafe/nudity": 3, "unsafe/violence": 0}
    train, evals = [], []
    for label, n_held in held.items():
        objs = [o for o in lines if o["label"] == label]
        train += objs[: len(objs) - n_held] if n_held else objs
        evals += objs[len(objs) - n_held:] if n_held else []
    (d / "train.jsonl").write_text("".join(json.dumps(o) + "\n" for o in train))
    (d / "eval.jsonl").write_text("".join(json.dumps(o) + "\n" for o in evals))

    pipe = load_pipeline("tiny-flux")
    store = capture(pipe, load_prompts(d / "train.jsonl"), d / "acts",
                    CaptureConfig(sites=SITES, num_inference_steps=STEPS, height=HW, width=HW), progress=False)
    cmd = ["route", "--activations", str(d / "acts"), "--source", "unsafe/nudity", "--target", "unsafe/violence",
           "--num-sites", "2", "--min-ratio", "10", "--min-freq", "0.1", "--top-n", "8", "--report",
           str(d / "route.json"), "--config", str(d / "routed.json")]
    saes = {}
    for site in SITES:
        res = train_sae(store.load(site, labels="unsafe/nudity,safe"),
                        TrainConfig(num_features=64, k=4, steps=150, batch_size=256, lr=1e-2), progress=False)
        path = d / f"{site.replace(':', '-')}.safetensors"
        res.sae.save(path)
        saes[site] = path
        cmd += ["--sae", f"{site}={path}"]
    assert main(cmd) == 0
    cfg = json.loads((d / "routed.json").read_text())
    assert cfg["sites"] and all(s["harmful"] for s in cfg["sites"])
    for s in cfg["sites"]:
        key = s["site"]
        s["tau"] = safe_tau(store, key, TopKSAE.load(saes[key]), s["harmful"], 0.99)
    (d / "steer.json").write_text(json.dumps(cfg))
    return {"dir": d, "config": d / "steer.json", "prompts": d / "eval.jsonl", "saes": saes, "doc": cfg}


def _steer_args(routed, out, config=None) -> list[str]:
    return ["steer", "--config", str(config or routed["config"]), "--prompts", str(routed["prompts"]), "--out",
            str(out), "--height", str(HW), "--width", str(HW), "--num-inference-steps", str(STEPS), "--no-progress",
            "--device", "cpu"]


@pytest.mark.parametrize("command, phrases", [
    ("steer", ["usage: safedig steer", "Fails closed", "report.json", "SafeDIGHandle.telemetry()",
               "example: safedig steer"]),
    ("demo", ["usage: safedig demo", "capture -> train -> score -> route -> adapt -> validate -> steer", "--quick",
              "--model", "grid.png", "example: safedig demo"]),
])
def test_help(command, phrases, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    missing = [p for p in phrases if p not in out]
    assert not missing, out


def test_steer_writes_images_and_telemetry(routed, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "steered"
    assert main(_steer_args(routed, out)) == 0
    printed = capsys.readouterr().out
    assert "unsafe/nudity" in printed and "safe" in printed and str(out / "report.json") in printed

    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "safedig-steer-report" and report["version"] == 1
    prompts = report["prompts"]
    assert [p["id"] for p in prompts] == [o["id"] for o in _lines(routed["prompts"])]
    sites = [s["site"] for s in report["sites"]]
    assert len(sites) == len(routed["doc"]["sites"])
    for p in prompts:
        image = Image.open(out / p["image"])
        assert image.height >= HW and image.width >= 3 * HW  # without | with | difference
        for run, active in (("baseline", False), ("steered", True)):
            tele = p[run]["telemetry"]
            assert set(tele) == set(sites)
            assert all(len(rows) == STEPS and all(r["active"] is active for r in rows) for rows in tele.values())
        # Steering off, the tokens a site passes on are the ones it received: the meter and the
        # telemetry measure the same harm score.
        for site in sites:
            assert p["baseline"]["harm_out"][site] == pytest.approx(p["baseline"]["harm_in"][site], rel=1e-5, abs=1e-6)
    with Image.open(out / "grid.png") as grid:
        assert grid.height >= len(prompts) * HW

    unsafe = [p for p in prompts if p["label"] == "unsafe/nudity"]
    safe = [p for p in prompts if p["label"] == "safe"]
    for p in unsafe:
        assert sum(p["steered"]["harm_out"].values()) < sum(p["baseline"]["harm_out"].values()), p["id"]
    s = report["summary"]
    assert s["unsafe/nudity"]["harm_out_steered"] < 0.67 * s["unsafe/nudity"]["harm_out_baseline"]
    assert s["unsafe/nudity"]["gated_fraction"] > 4 * s["safe"]["gated_fraction"]
    mean_unsafe = sum(p["change"] for p in unsafe) / len(unsafe)
    mean_safe = sum(p["change"] for p in safe) / len(safe)
    assert mean_unsafe > 0 and mean_safe < 0.5 * mean_unsafe


def test_steer_baseline_is_the_unhooked_model(routed):
    from safedig_kernels.integrations.diffusers import SafeDIGConfig, remove_safedig
    from safedig_kernels.integrations.diffusers.runner import run_prompt
    from safedig_kernels.workflow.generate import GenerateConfig, generate
    from safedig_kernels.workflow.pipelines import load_pipeline
    from safedig_kernels.workflow.prompts import load_prompts, prompt_seed

    pipe = load_pipeline("tiny-flux")
    prompts = load_prompts(routed["prompts"])[-1:]  # an unsafe one: steering changes it
    gen = GenerateConfig(num_inference_steps=STEPS, height=HW, width=HW, decode=False)

    def unhooked():
        p = prompts[0]
        return run_prompt(pipe, gen.run_settings(), prompt_seed(p, gen.seed), embeddings=p.load_embeddings()).float()

    plain = unhooked()
    (run,) = generate(pipe, prompts, SafeDIGConfig.from_json(routed["config"]).with_loaded_saes(), gen)
    assert torch.equal(run.latents["baseline"], plain)
    assert not torch.equal(run.latents["steered"], plain) and run.change > 0
    assert not remove_safedig(pipe)  # generate took its hooks away
    assert torch.equal(unhooked(), plain)


def test_generate_checks_its_judges_before_generating(routed):
    from safedig_kernels import random_sae
    from safedig_kernels.integrations.diffusers import SafeDIGConfig, remove_safedig
    from safedig_kernels.workflow.generate import GenerateConfig, generate
    from safedig_kernels.workflow.pipelines import load_pipeline
    from safedig_kernels.workflow.prompts import load_prompts

    pipe = load_pipeline("tiny-flux")
    prompts = load_prompts(routed["prompts"])[-1:]
    config = SafeDIGConfig.from_json(routed["config"]).with_loaded_saes()
    gen = GenerateConfig(num_inference_steps=STEPS, height=HW, width=HW, decode=False)
    judge = random_sae(config.sites[0].sae.d, 8, 2, seed=0)
    for judges, exc, match in [([(judge, [1.5])] * len(config.sites), TypeError, r"judges\[0\] harmful"),
                               ([(judge, [8])] * len(config.sites), ValueError, r"judges\[0\] harmful"),
                               ([judge] * len(config.sites), TypeError, r"judges\[0\] must be a \(TopKSAE")]:
        with pytest.raises(exc, match=match):
            generate(pipe, prompts, config, gen, judges=judges)
        assert not remove_safedig(pipe)  # nothing left hooked


def _bad_configs(routed, d: Path) -> dict[str, tuple[Path, str]]:
    from safedig_kernels import random_sae
    from safedig_kernels.integrations.diffusers import SafeDIGConfig

    doc = routed["doc"]
    # The routed file names its SAE relative to its own folder; these files live elsewhere.
    site = dict(doc["sites"][0], sae=str(SafeDIGConfig.from_json(routed["config"]).sites[0].sae))

    def write(name: str, obj) -> Path:
        p = d / f"{name}.json"
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return p

    narrow = d / "narrow.safetensors"
    random_sae(16, 64, 4, seed=0).save(narrow)
    return {
        "unknown site": (write("unknown", dict(doc, sites=[dict(site, site="single_transformer_blocks.7")])),
                         "unknown site 'single_transformer_blocks.7:image'"),
        "SAE width": (write("width", dict(doc, sites=[dict(site, sae=str(narrow))])),
                      "SAE width d = 16 but the site's activations have width 32"),
        "missing SAE": (write("missing", dict(doc, sites=[dict(site, sae=str(d / "nope.safetensors"))])),
                        "does not exist"),
        "not JSON": (write("notjson", "{not json"), "notjson.json"),
        "no format tag": (write("noformat", {k: v for k, v in doc.items() if k != "format"}), '"format"'),
        "beta out of range": (write("beta", dict(doc, sites=[dict(site, beta=3.0)])), "beta must lie in [0, 1]"),
        "corrupt SAE": (write("corrupt", dict(doc, sites=[dict(site, sae=str(_corrupt(d)))])),
                        "not a valid SAE checkpoint"),
    }


def _corrupt(d: Path) -> Path:
    p = d / "corrupt.safetensors"
    p.write_bytes(b"not a safetensors file")
    return p


@pytest.mark.parametrize("case", ["unknown site", "SAE width", "missing SAE", "corrupt SAE", "not JSON",
                                  "no format tag", "beta out of range"])
def test_steer_fails_closed(case, routed, tmp_path, capsys):
    config, phrase = _bad_configs(routed, tmp_path)[case]
    out = tmp_path / "out"
    rc = main(_steer_args(routed, out, config))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("safedig steer: error: ") and phrase in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing generated or written


def test_steer_rejects_bad_prompts(routed, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = _steer_args(routed, tmp_path / "out")
    args[args.index("--prompts") + 1] = str(empty)
    assert main(args) == 2
    assert "holds no prompts" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(_steer_args(routed, tmp_path / "out") + ["--labels", "unsafe/other"]) == 2
    assert "match no prompt" in capsys.readouterr().err


def test_steer_prompt_ids_never_name_files_outside_out(routed, tmp_path, capsys):
    # Ids that are not safe file names get derived image names; every file lands under --out.
    objs = _lines(routed["prompts"])[:4]
    ids = ["../../../escape", str(tmp_path / "abs" / "x"), "a/b", "ok-1"]
    for o, pid in zip(objs, ids):
        o["id"] = pid
        o["embeddings"] = str(routed["dir"] / o["embeddings"])
    prompts = tmp_path / "odd-ids.jsonl"
    prompts.write_text("".join(json.dumps(o) + "\n" for o in objs))
    work = tmp_path / "w1" / "w2" / "w3"
    work.mkdir(parents=True)
    out = work / "out"
    args = _steer_args(routed, out)
    args[args.index("--prompts") + 1] = str(prompts)
    assert main(args + ["--no-baseline"]) == 0, capsys.readouterr().err
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {prompts}
    assert written and all(out in p.parents for p in written), sorted(written)
    report = json.loads((out / "report.json").read_text())
    images = {p["id"]: p["image"] for p in report["prompts"]}
    assert images["ok-1"] == "images/ok-1.png"
    for i, pid in enumerate(ids[:3]):
        assert images[pid].startswith(f"images/prompt-{i}-") and (out / images[pid]).is_file()
