"""`safedig demo` on the CPU: the demo end to end (quick size, on the shipped world weights, and
on the random tiny FLUX) with the numbers it must show, its determinism, the commands it prints
to rerun its last stage and its evaluation from its files, and README's first command."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from safedig_kernels.cli import build_parser, main

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert torch.get_num_threads() == threads  # the demo's thread setting does not leak
    return rc, out, json.loads((out / "summary.json").read_text())


def check_harm_table(summary, safe_moved_at_most, gate_ratio=4.0, safe_gated_at_most=0.05):
    """The SAE-side numbers: harm falls on unsafe prompts, in the source domain with the source
    steerer (it knows no other) and in both with SafeDIG; few safe tokens pass the gate, and
    safe outputs move far less than unsafe ones."""
    rows = {r["label"]: r for r in summary["table"]}
    source, target = summary["config"]["source"], summary["config"]["target"]
    assert set(rows) == {source, target, "safe"}
    for cfg, labels in (("source_sae", (source,)), ("adapted_sae", (source, target))):
        for label in labels:
            r = rows[label]
            assert r[cfg]["harm"] < 0.67 * r["harm_unsteered"], (cfg, label, r)
            assert r[cfg]["gated_fraction"] > gate_ratio * rows["safe"][cfg]["gated_fraction"]
        safe = rows["safe"][cfg]
        assert safe["gated_fraction"] < safe_gated_at_most
        assert safe["latents_moved"] < 0.2 * min(rows[x][cfg]["latents_moved"] for x in (source, target))
        assert safe["latents_moved"] < safe_moved_at_most


def test_demo_quick_end_to_end(quick_demo, capsys):
    from PIL import Image

    from safedig_kernels.integrations.diffusers import SafeDIGConfig
    from safedig_kernels.sae import TopKSAE
    from safedig_kernels.workflow.demo import GRID_ROWS
    from safedig_kernels.workflow.validate import site_operators
    from safedig_kernels.workflow.world import SHIPPED_WEIGHTS

    rc, out, summary = quick_demo
    assert rc == 0
    assert summary["format"] == "safedig-demo" and summary["config"]["quick"] is True
    assert summary["model"] == "world" and Path(summary["files"]["world"]) == SHIPPED_WEIGHTS
    source, target = summary["config"]["source"], summary["config"]["target"]

    # What a user looks for first: the detector, which knows nothing of the SAEs, sees the mark
    # on every unsteered unsafe image and on no safe one, in any column; safe images stay close
    # to the unsteered ones. (Whether steering removes the marks is the full demo's measurement,
    # README and docs/workflow.md: at this size it is not asserted.)
    assert summary["detector"]["name"] == "world"
    assert summary["seed"] == 0 and summary["domains"] == {"source": [source], "target": [target]}
    rate, psnr = summary["unsafe_rate"], summary["safe_psnr_db"]
    for label in (source, target):
        assert rate[label]["unsteered"] == 1.0, rate
    assert all(v == 0.0 for v in rate["safe"].values()), rate
    assert psnr["unsteered"] is None and min(psnr["source"], psnr["adapted"]) > 30.0, psnr
    assert summary["unsafe"][source]["unsteered"]["n"] == summary["config"]["eval_prompts"]
    check_harm_table(summary, safe_moved_at_most=0.1, gate_ratio=2.0, safe_gated_at_most=0.1)

    # The paper's table: every method a row, each with its column of images judged; the fixed-
    # site rows and the routing check come from one single-site column per steerable site.
    columns = {"unsteered", "source", "adapted", "finetune", "unadapted", "blend", "repel", "both"}
    sites = [r["site"] for r in summary["site_check"] if r["rank"] is not None]
    assert sites and columns | {"site-" + s.replace(":", "-") for s in sites} == set(rate[source])
    methods = [r["method"] for r in summary["methods"]]
    assert methods[:5] == ["no steering", "source SAEs (no adaptation)",
                           "SafeDIG (frozen encoder, adapted decoder, validated sites)", "full fine-tune (encoder too)",
                           "SafeDIG with the source decoders (decoder not adapted)"]
    assert methods[5:] == ["best single fixed site, no routing", "worst single fixed site, no routing",
                           "Blend only", "Repel only", "Blend + Repel (both)"]
    for row in summary["methods"]:
        n_s, n_t = row["source"]["n"], row["target"]["n"]
        assert row["overall"]["unsafe"] == row["source"]["unsafe"] + row["target"]["unsafe"]
        assert row["overall"]["n"] == n_s + n_t and row["source"]["rate"] == rate[source][row["column"]]
    best, worst = summary["methods"][5], summary["methods"][6]
    assert best["target"]["rate"] <= worst["target"]["rate"]
    assert [r["rank"] for r in summary["site_check"] if r["rank"] is not None] == list(range(1, len(sites) + 1))
    assert {r["site"] for r in summary["site_check"] if r["routed"]} == {
        s["site"] for s in summary["selected"] if s["routed"]}
    # Adaptation keeps the encoding function (encoder and b_dec), so the gate stays the source's.
    for s in summary["selected"]:
        assert s["tau_adapted"] == s["tau_source"]

    t = summary["overhead"]
    assert t["ms_per_step_without"] > 0 and t["ms_per_step_with"] > 0
    assert t["calls_timed"] == summary["config"]["timing_repeats"] * summary["config"]["num_inference_steps"]

    with Image.open(out / "grid.png") as grid:
        scale = -(-128 // summary["config"]["height"])  # workflow.report.image_scale
        assert grid.height >= 3 * GRID_ROWS * summary["config"]["height"] * scale
        assert grid.width >= 4 * summary["config"]["width"] * scale  # unsteered | source | adapted | diff
    assert Path(summary["files"]["grid"]) == out / "grid.png"
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["unsafe"] == summary["unsafe"] and (out / "eval" / "eval.md").is_file()

    # The configs it wrote are what `safedig steer` and apply_safedig read; the adapted SAEs
    # keep the source encoder bit for bit; the source steerer knows the source's harmful
    # features only, and each config steers with the operators validation chose for it.
    src, ad = SafeDIGConfig.from_json(out / "steer.json"), SafeDIGConfig.from_json(out / "steer-adapted.json")
    # summary.json's `selected`: the routed sites first, then any other site a method steers
    selected = {s["site"]: s for s in summary["selected"]}
    assert [s.site for s in ad.sites] == [s["site"] for s in summary["selected"] if s["operator"] is not None]
    assert [s["routed"] for s in summary["selected"]] == sorted((s["routed"] for s in summary["selected"]),
                                                                reverse=True)
    assert src.sites and {s.site for s in src.sites} <= set(selected)
    for s in src.sites:
        mine = selected[s.site]
        assert list(s.harmful) == mine["harmful_source_only"] and s.tau == mine["tau_source_only"]
        assert set(s.harmful) <= set(mine["harmful"]) and site_operators(src)[s.site] == mine["operator_source"]
    validation = summary["validation"]
    assert set(validation) == {"source", "adapted", "finetune"}
    assert validation["source"]["labels"] == [source] and validation["adapted"]["labels"] == [source, target]
    train = summary["config"]["train_prompts"]
    for name, conf in (("source", src), ("adapted", ad)):
        v = validation[name]
        assert v["prompts"] == train * (len(v["labels"]) + 1)
        assert all(t["n"] == train * len(v["labels"]) for t in v["trials"])
        winner = next(t for t in v["trials"] if t["name"] == v["chosen"])
        assert site_operators(conf) == winner["operators"]
    adapted_saes = {a.site: a.sae for a in ad.sites}
    for s in (s for s in src.sites if s.site in adapted_saes):
        s_sae, a_sae = TopKSAE.load(s.sae), TopKSAE.load(adapted_saes[s.site])
        assert torch.equal(s_sae.W_enc, a_sae.W_enc) and torch.equal(s_sae.b_enc, a_sae.b_enc)
        assert torch.equal(s_sae.b_dec, a_sae.b_dec)
        assert not torch.equal(s_sae.W_dec, a_sae.W_dec)
    for name in ("steer-source", "steer-adapted"):
        report = json.loads((out / name / "report.json").read_text())
        assert len(report["prompts"]) == 3 * summary["config"]["eval_prompts"]


def test_demo_on_the_random_tiny_flux(tmp_path, capsys):
    """`--model tiny-flux`: the synthetic-embedding demo still runs; no detector, so only the
    SAE-side numbers."""
    assert main(["demo", "--quick", "--model", "tiny-flux", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["model"] == "tiny-flux" and "unsafe_rate" not in summary and summary["files"]["world"] == ""
    check_harm_table(summary, safe_moved_at_most=0.005)
    assert "Unsafe rate" not in capsys.readouterr().out


def test_demo_rerun_is_deterministic(quick_demo, capsys):
    _, out, first = quick_demo
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0  # replaces its own files
    printed = capsys.readouterr().out
    second = json.loads((out / "summary.json").read_text())
    assert second["table"] == first["table"] and second["selected"] == first["selected"]
    assert second["unsafe"] == first["unsafe"] and second["safe_similarity"] == first["safe_similarity"]
    for phrase in ("Unsafe rate of the final images", "Harm score h", "Final latents moved", "Steering overhead, cpu",
                   str(out / "grid.png")):
        assert phrase in printed


def _printed_command(printed: str, prefix: str) -> list[str]:
    line = next(x for x in printed.splitlines() if x.startswith(prefix))
    return shlex.split(line[len(prefix):].strip())


def test_the_commands_the_demo_prints_reproduce_it(quick_demo, tmp_path, capsys):
    """The demo's last stages are `safedig steer` and `safedig eval` on the files it wrote:
    rerunning the commands it prints moves every held-out prompt's latents exactly as the demo
    did, and the detector sees the same."""
    _, out, summary = quick_demo
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    steer = _printed_command(printed, "rerun the last stage: safedig")
    steer[steer.index("--out") + 1] = str(tmp_path / "again")
    assert main(steer + ["--no-progress", "--no-images"]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["prompts"]
    demo = json.loads((out / "steer-adapted" / "report.json").read_text())["prompts"]
    assert [p["id"] for p in again] == [p["id"] for p in demo]
    assert [p["change"] for p in again] == [p["change"] for p in demo]
    assert any(p["change"] > 0 for p in again)

    evaluate = _printed_command(printed, "evaluate again: safedig")
    evaluate[evaluate.index("--out") + 1] = str(tmp_path / "eval")
    assert main(evaluate + ["--no-progress"]) == 0
    assert "| unsafe/concept_a |" in capsys.readouterr().out
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    printed_columns = ("unsteered", "source", "adapted")  # the two configs the command names
    assert ev["unsafe"] == {lb: {c: cols[c] for c in printed_columns} for lb, cols in summary["unsafe"].items()}
    assert ev["safe_similarity"] == {c: summary["safe_similarity"][c] for c in printed_columns[1:]}
    assert sorted(p.name for p in (tmp_path / "eval" / "images").iterdir()) == ["adapted", "source", "unsteered"]


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safedig demo: error: --out") and "not written by safedig demo" in err
    assert keep.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_readme_first_command_is_the_default_demo():
    from safedig_kernels.cli.demo import _demo_config
    from safedig_kernels.workflow.demo import DemoConfig

    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    first = next(line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    assert first.rstrip().endswith("safedig demo"), first  # no arguments: the built-in default
    args = build_parser().parse_args(["demo"])
    assert args.out == "safedig-demo" and not args.quick
    assert _demo_config(args) == DemoConfig()
    assert DemoConfig() != DemoConfig.quick_config()  # the test above runs the smaller size, not this one


def test_the_dictionary_labels_are_corpus_only(quick_demo):
    """The world's gold-alone prompts are captured for the SAEs' corpus (training prompts only);
    nothing holds them out, steers them for the table or judges them."""
    from safedig_kernels.workflow.prompts import load_prompts
    from safedig_kernels.workflow.world import GILDING

    _, out, summary = quick_demo
    assert summary["config"]["dictionary"] == [GILDING]
    train = [r.label for r in load_prompts(out / "prompts" / "train.jsonl")]
    held = {r.label for r in load_prompts(out / "prompts" / "eval.jsonl")}
    assert train.count(GILDING) == summary["config"]["train_prompts"] and GILDING not in held
    assert GILDING not in summary["unsafe_rate"] and GILDING not in summary["domains"]["target"]
    assert all(GILDING not in v["labels"] for v in summary["validation"].values())


@pytest.mark.parametrize("dictionary, match", [
    (["unsafe/concept_a"], "not the safe, source or target label"),
    (["safe"], "not the safe, source or target label"),
    (["safe/gold"], "or one of their sub-labels"),
    (["unsafe/other"], "the world's labels"),
    (["gold"], "label must be 'safe' or 'unsafe/<category>'"),
])
def test_demo_refuses_a_dictionary_it_cannot_use(dictionary, match):
    from safedig_kernels.workflow.demo import DemoConfig

    with pytest.raises(ValueError, match=match):
        DemoConfig(dictionary=dictionary)
    assert DemoConfig(model="tiny-flux").dictionary == [] and DemoConfig(dictionary=[]).dictionary == []


def test_a_user_prompt_file_holds_out_no_dictionary_prompt():
    from types import SimpleNamespace

    from safedig_kernels.workflow.demo import split_prompts

    records = [SimpleNamespace(label=label, id=f"{label}-{i}") for label in ("safe", "unsafe/a", "unsafe/broad")
               for i in range(6)]
    train, held = split_prompts(records, 2, train_only=["unsafe/broad"])
    assert [r.id for r in held] == ["safe-4", "safe-5", "unsafe/a-4", "unsafe/a-5"]
    assert sorted(r.id for r in train if r.label == "unsafe/broad") == [f"unsafe/broad-{i}" for i in range(6)]
    assert len(train) + len(held) == len(records)


def test_demo_names_a_dictionary_label_missing_from_the_prompts(tmp_path, capsys):
    from safedig_kernels.workflow.world import LABELS, write_world_prompts

    prompts = write_world_prompts(tmp_path / "p", {label: 2 for label in LABELS})
    rc = main(["demo", "--model", "tiny-flux", "--prompts", str(prompts), "--source", LABELS[1], "--target",
               LABELS[2], "--dictionary", "unsafe/broad", "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no prompts labelled ['unsafe/broad']" in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_demo_refuses_a_quality_budget_that_is_not_a_number(tmp_path, capsys, value):
    assert main(["demo", "--quick", "--min-psnr", value, "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "min_psnr_db must be a finite number of dB" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything is written
