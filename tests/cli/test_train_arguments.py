"""`safedig train` checks every argument before it opens the activation store or trains: each bad
value is a one-line error (exit code 2) naming its option, and the store is never constructed."""
from __future__ import annotations

import math
import os

import pytest

from safedig_kernels.cli import main
from safedig_kernels.workflow import store as store_mod
from safedig_kernels.workflow.train import TrainConfig


@pytest.fixture
def no_store(monkeypatch):
    """Opening a store fails the test: every check must come before it."""
    opened = []

    class Refuse:
        def __init__(self, *a, **kw):
            opened.append(a)
            raise AssertionError("ActivationStore was opened before the arguments were checked")

    monkeypatch.setattr(store_mod, "ActivationStore", Refuse)
    return opened


def _argv(tmp_path, *extra: str) -> list[str]:
    # --activations names a folder that does not exist: an error about it would mean the
    # bad argument was not checked first.
    return ["train", "--activations", str(tmp_path / "no-such-capture"), "--site", "transformer_blocks.0",
            "--out", str(tmp_path / "sae.safetensors"), "--no-progress", "--device", "cpu", *extra]


BAD = [
    (["--k", "0"], "--k must be an int in [1, 256], got 0"),
    (["--k", "257"], "--k must be an int in [1, 256], got 257"),
    (["--k", "65", "--features", "64"], "--k must be an int in [1, --features = 64], got 65"),
    (["--features", "0"], "--features must be a positive int"),
    (["--expansion", "0"], "--expansion must be a positive int"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr=-1e-3"], "--lr must be a finite number > 0"),
    (["--aux-coef", "inf"], "--aux-coef must be a finite number >= 0, got inf"),
    (["--aux-coef=-0.5"], "--aux-coef must be a finite number >= 0"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--batch-size", "0"], "--batch-size must be a positive int"),
    (["--dead-after-tokens", "0"], "--dead-after-tokens must be a positive int"),
    (["--aux-k=-1"], "--aux-k must be a non-negative int"),
    (["--log-every=-1"], "--log-every must be a non-negative int"),
    (["--checkpoint-every=-2"], "--checkpoint-every must be a non-negative int"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--max-tokens", "100", "--batch-size", "200"], "--batch-size 200 exceeds --max-tokens 100"),
    (["--memory-mb", "0"], "--memory-mb must be a positive int (MiB), got 0"),
    (["--memory-mb=-64"], "--memory-mb must be a positive int (MiB), got -64"),
    (["--site", "transformer_blocks.0:video"], "stream must be one of"),
    (["--device", "bogus"], "--device must be a torch device"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_argument_fails_before_the_store_opens(tmp_path, capsys, no_store, extra, message):
    rc = main(_argv(tmp_path, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("safedig train: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "no-such-capture" not in err
    assert not no_store and not (tmp_path / "sae.safetensors").exists()


def test_outputs_that_cannot_be_written(tmp_path, capsys, no_store):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        (["--out", str(blocker / "sae.safetensors")], "--out"),
        (["--metrics", str(blocker / "sub" / "m.json")], "--metrics"),
        (["--checkpoint-dir", str(blocker)], "--checkpoint-dir"),
        (["--checkpoint-dir", str(blocker / "ckpt")], "--checkpoint-dir"),
        (["--out", str(tmp_path)], "--out"),  # a folder, not a file path
    ]
    for extra, option in cases:
        rc = main(_argv(tmp_path, *extra))
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"safedig train: error: {option} ") and err.count("\n") == 1, (extra, err)
    assert not no_store and blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into a read-only folder")
def test_output_folder_not_writable(tmp_path, capsys, no_store):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = main(_argv(tmp_path, "--metrics", str(ro / "m.json")))
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2 and "--metrics" in err and "not writable" in err, err


def test_outputs_in_folders_yet_to_be_made_are_fine(tmp_path, capsys, no_store):
    # Everything checks out, so the command goes on to open the store (which this test refuses).
    with pytest.raises(AssertionError, match="ActivationStore was opened"):
        main(_argv(tmp_path, "--metrics", str(tmp_path / "new" / "deeper" / "m.json"), "--checkpoint-dir",
                   str(tmp_path / "new" / "ckpt"), "--lr", "1e-3", "--k", "256"))
    assert len(no_store) == 1


# -- the library shares the checks -----------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(lr=math.inf), r"lr must be a finite number > 0, got inf"),
    (dict(lr=math.nan), r"lr must be a finite number > 0, got nan"),
    (dict(lr=0.0), r"lr must be a finite number > 0"),
    (dict(aux_coef=math.inf), r"aux_coef must be a finite number >= 0, got inf"),
    (dict(aux_coef=math.nan), r"aux_coef must be a finite number >= 0"),
    (dict(aux_coef=-1.0), r"aux_coef must be a finite number >= 0"),
    (dict(k=257), r"k must be an int in \[1, 256\], got 257"),
    (dict(k=0), r"k must be an int in \[1, 256\], got 0"),
    (dict(k=True), r"k must be an int in \[1, 256\], got True"),
    (dict(num_features=8, k=9), r"k must be an int in \[1, num_features = 8\], got 9"),
    (dict(dtype="int8"), r"dtype must be one of"),
    (dict(steps=0), r"steps must be a positive int"),
    (dict(seed=1.5), r"seed must be an int"),
    (dict(memory_budget_mb=0), r"memory_budget_mb must be a positive int \(MiB\), got 0"),
    (dict(memory_budget_mb=2.5), r"memory_budget_mb must be a positive int \(MiB\), got 2.5"),
])
def test_train_config_check(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw).check()
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw).resolved(16)  # resolved(d) runs the same checks


def test_train_config_check_names_and_d_dependent_checks():
    with pytest.raises(ValueError, match=r"--k must be an int in \[1, 256\]"):
        TrainConfig(k=300).check({"k": "--k"})
    assert TrainConfig().check() is not None and TrainConfig(lr=1e-3).resolved(16).lr == 1e-3
    # F = expansion * d is only known with d: k <= F is checked by resolved.
    TrainConfig(expansion=1, k=32).check()
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_features = 16\], got 32"):
        TrainConfig(expansion=1, k=32).resolved(16)
