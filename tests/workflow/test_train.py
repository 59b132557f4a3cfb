"""TopK-SAE training: loss falls, decoder rows stay unit norm, the scale is folded correctly,
AuxK revives dead latents, checkpoints resume exactly, and 2-process DDP equals 1 process."""
from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from safedig_kernels.workflow.train import (
    TrainConfig,
    _TopKSAEModule,
    activation_scale,
    evaluate_sae,
    latest_train_checkpoint,
    train_sae,
)

D = 16


def sparse_data(n: int = 2048, d: int = D, atoms: int = 48, seed: int = 0) -> torch.Tensor:
    """Tokens that are sparse combinations of `atoms` random unit directions plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    codes = (torch.rand(n, atoms, generator=g) < 0.06) * (0.5 + 2 * torch.rand(n, atoms, generator=g))
    return 3.0 * (codes @ dirs + 0.3 + 0.02 * torch.randn(n, d, generator=g))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sparse_data()


def test_training_lowers_loss_keeps_unit_norm_and_folds_scale(data):
    cfg = TrainConfig(num_features=64, k=6, steps=150, batch_size=256, lr=3e-3, log_every=10)
    result = train_sae(data, cfg, progress=False)
    fvu = [h["fvu"] for h in result.history]
    assert fvu[-1] < 0.5 * fvu[0], fvu
    sae = result.sae
    s = result.activation_scale
    assert sae.metadata.activation_scale == pytest.approx(s)
    # Unit norm holds in the trained (scaled) space; folding divides the decoder by s.
    torch.testing.assert_close(sae.W_dec.norm(dim=1) * s, torch.ones(64), rtol=0, atol=1e-5)
    # The folded SAE, applied to raw x, reconstructs as well as training reported.
    ev = evaluate_sae(sae, data)
    assert ev["fvu"] == pytest.approx(fvu[-1], abs=0.05)
    assert ev["l0"] <= 6 and ev["dead_fraction"] < 0.5


def test_activation_scale_normalises_mean_squared_norm(data):
    s = activation_scale(data)
    assert float((data * s).pow(2).sum(-1).mean()) == pytest.approx(D, rel=1e-6)
    assert activation_scale(data * 10) == pytest.approx(s / 10, rel=1e-6)


def test_auxk_gives_dead_latents_a_gradient():
    # With k = 1 and 256 latents most latents never win the top-k in a few steps, so without
    # AuxK their encoder columns get no gradient and stay exactly at their initial value.
    data = sparse_data(n=512, seed=1)
    base = dict(num_features=256, k=1, steps=4, batch_size=64, lr=1e-2, dead_after_tokens=64, log_every=1)
    init = _TopKSAEModule(D, 256, torch.zeros(D), seed=0, dtype=torch.float32).W_enc.detach()
    changed = {}
    for coef in (0.0, 1 / 32):
        r = train_sae(data, TrainConfig(**base, aux_coef=coef), progress=False)
        moved = ((r.sae.W_enc / r.activation_scale - init).abs() > 1e-4).any(0)
        changed[coef] = int(moved.sum())
        assert (max(h["aux_loss"] for h in r.history) > 0) == (coef > 0)
    assert changed[0.0] <= 4 * 64  # at most the latents that fired (k = 1 per token)
    assert changed[1 / 32] > changed[0.0] + 50


def test_resume_continues_exactly(data, tmp_path):
    cfg = TrainConfig(num_features=32, k=4, steps=20, batch_size=128, lr=3e-3, dead_after_tokens=256,
                      checkpoint_every=5, log_every=5)
    straight = train_sae(data, cfg, checkpoint_dir=tmp_path / "a", progress=False)
    half = TrainConfig(**{**cfg.__dict__, "steps": 10})
    train_sae(data, half, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = train_sae(data, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 10
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(straight.sae, name), getattr(resumed.sae, name)), name
    assert [h["step"] for h in resumed.history] == [5, 10, 15, 20]
    # Only the newest `keep_checkpoints` pairs are kept.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "step-00000015.json", "step-00000015.safetensors", "step-00000020.json", "step-00000020.safetensors"]
    info = json.loads((tmp_path / "a" / "step-00000020.json").read_text())
    assert info["format"] == "safedig-sae-train" and info["adam_step"] == 20
    assert set(load_file(str(tmp_path / "a" / "step-00000020.safetensors"))) >= {
        "W_enc", "b_enc", "W_dec", "b_dec", "adam.W_dec.exp_avg", "adam.W_dec.exp_avg_sq", "tokens_since_fired"}


def test_resume_refuses_other_settings_or_data(data, tmp_path):
    cfg = TrainConfig(num_features=32, k=4, steps=4, batch_size=128)
    train_sae(data, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"other settings .*'k': \(4, 5\)"):
        train_sae(data, TrainConfig(num_features=32, k=5, steps=8, batch_size=128), checkpoint_dir=tmp_path,
                  progress=False)
    with pytest.raises(ValueError, match="trained on other data"):
        train_sae(data[:1024], TrainConfig(num_features=32, k=4, steps=8, batch_size=128), checkpoint_dir=tmp_path,
                  progress=False)


def test_damaged_newest_checkpoint_falls_back_to_older(data, tmp_path):
    cfg = TrainConfig(num_features=32, k=4, steps=6, batch_size=128, checkpoint_every=3)
    train_sae(data, cfg, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "step-00000006.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"skipping training checkpoint .*step-00000006\.json"):
        info, _ = latest_train_checkpoint(tmp_path)
    assert info["step"] == 3
    assert (tmp_path / "step-00000006.json").exists()  # reported, never deleted


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=4096), r"batch_size 4096 exceeds the number of training tokens 2048"),
    (dict(num_features=8, k=9), r"k must be an int in \[1, num_features = 8\], got 9"),
    (dict(dtype="int8"), r"dtype must be one of"),
    (dict(dead_after_tokens=0), r"dead_after_tokens must be a positive int"),
])
def test_bad_config(data, kw, message):
    base = dict(num_features=32, k=4, steps=2, batch_size=128)
    with pytest.raises(ValueError, match=message):
        train_sae(data, TrainConfig(**{**base, **kw}), progress=False)


def test_bad_data():
    with pytest.raises(ValueError, match=r"data must be a non-empty floating tensor \[N, d\]"):
        train_sae(torch.zeros(0, 4), TrainConfig(num_features=8, k=2, steps=1, batch_size=1), progress=False)


# -- DDP -------------------------------------------------------------------------------------

DDP_CONFIG = dict(num_features=128, k=2, steps=12, batch_size=128, lr=3e-3, dead_after_tokens=128, dtype="float64",
                  log_every=1)


def _ddp_worker(rank: int, num_ranks: int, init_file: str, data_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        data = load_file(data_file)["x"]
        result = train_sae(data, TrainConfig(**DDP_CONFIG), progress=False)
        if rank == 0:
            save_file({n: getattr(result.sae, n).contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
                      out_file, metadata={"metrics": json.dumps(result.metrics)})
        dist.barrier()  # leave together: tearing gloo down while the peer still works can abort it
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    data = sparse_data(n=1024, seed=2)
    save_file({"x": data}, str(tmp_path / "data.safetensors"))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data.safetensors"),
                                str(tmp_path / "ddp.safetensors")), nprocs=2, join=True)
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    single = train_sae(data, TrainConfig(**DDP_CONFIG), progress=False)
    init = train_sae(data, TrainConfig(**{**DDP_CONFIG, "steps": 1, "lr": 1e-12}), progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ref = getattr(single.sae, name)
        torch.testing.assert_close(ddp[name], ref, rtol=0, atol=1e-9, msg=name)
        assert (ref - getattr(init.sae, name)).abs().max() > 1e-3  # training moved it: the comparison means something
    # the AuxK path, with its all-reduced dead mask, was exercised
    assert max(h["aux_loss"] for h in single.history) > 0
