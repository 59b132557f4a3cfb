"""Training from a store larger than memory: `ActivationStore.stream` reads one tensor at a time
and, under DDP, each process only its share; `train_sae` on a stream stays within
`memory_budget_mb` (peak RSS measured in a subprocess), trains, is deterministic for a seed and
resumes exactly; two gloo processes read disjoint shares and train deterministically; a
selection that fits the budget trains exactly as without one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from safedig_kernels.cli import main
from safedig_kernels.workflow import store as store_mod
from safedig_kernels.workflow.store import ActivationStore, ActivationWriter, SiteSpec, partition_entries
from safedig_kernels.workflow.train import (
    MiB,
    StreamBatches,
    TrainConfig,
    evaluate_sae,
    stream_buffer_tokens,
    train_sae,
    training_data,
)

SITE = "single_transformer_blocks.0"
REPO = Path(__file__).resolve().parents[2]


def write_store(directory: Path, prompts: int, tokens: int = 64, d: int = 32, atoms: int = 32, steps=(0, 1),
                dtype=torch.bfloat16, shard_bytes: int = 64 << 10, seed: int = 0, distinct: int = 0) -> Path:
    """`prompts` prompts (alternately safe / unsafe/nudity) x `steps`, each `[tokens, d]`: sparse
    combinations (6 % density) of `atoms` unit directions plus an offset, so an SAE can learn them.
    `distinct` > 0 writes only that many different tensors, over and over (quicker to make)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    w = ActivationWriter(directory, {"synthetic": True}, shard_bytes=shard_bytes)
    made = []
    for i in range(prompts):
        label = "safe" if i % 2 else "unsafe/nudity"
        for step in steps:
            if distinct and len(made) >= distinct:
                x = made[(i * len(steps) + step) % distinct]
            else:
                codes = (torch.rand(tokens, atoms, generator=g) < 0.06) * (0.5 + 2 * torch.rand(tokens, atoms,
                                                                                                 generator=g))
                x = (3.0 * (codes @ dirs + 0.3 + 0.02 * torch.randn(tokens, d, generator=g))).to(dtype)
                made.append(x)
            w.add(x, site=SiteSpec.parse(SITE), step=step, prompt_id=f"p{i}", label=label)
        w.finish_prompt(f"p{i}", label)
    w.close()
    return Path(directory)


def _ident(e) -> tuple:
    return (e.prompt_id, e.site_key, e.step, e.call)


@pytest.fixture
def reads(monkeypatch):
    """Identities of the entries every stream in this process reads from a shard, in order."""
    seen = []
    real = store_mod.ActivationStream._read_run

    def spy(self, run):
        seen.extend(_ident(e) for e in run)
        yield from real(self, run)

    monkeypatch.setattr(store_mod.ActivationStream, "_read_run", spy)
    return seen


# -- the store side ---------------------------------------------------------------------------

def test_partition_is_disjoint_complete_balanced_and_not_in_capture_order(tmp_path):
    store = ActivationStore(write_store(tmp_path, prompts=10))
    entries = store.entries(SITE)
    for num_ranks in (1, 2, 3, 4, 7):
        shares = [partition_entries(entries, r, num_ranks) for r in range(num_ranks)]
        idents = [{_ident(e) for e in s} for s in shares]
        assert sum(len(s) for s in idents) == len(entries)  # disjoint ...
        assert set().union(*idents) == {_ident(e) for e in entries}  # ... and complete
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(s == [e for e in entries if e in s] for s in shares)  # each in store order
    # Dealing in store order would give rank 0 every step-0 entry (two steps per prompt) and
    # rank 1 every step 1; the hashed order mixes steps and labels into both shares.
    for r in (0, 1):
        share = partition_entries(entries, r, 2)
        assert {e.step for e in share} == {0, 1} and {e.label for e in share} == {"safe", "unsafe/nudity"}
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_ranks\)"):
        partition_entries(entries, 2, 2)


def test_stream_selects_what_load_returns_and_each_share_reads_only_itself(tmp_path, reads):
    store = ActivationStore(write_store(tmp_path, prompts=9, tokens=40))
    for kw in ({}, {"max_tokens": 300, "seed": 5}, {"labels": "unsafe", "steps": [1]}):
        want = store.load(SITE, **kw)
        reads.clear()
        whole = store.stream(SITE, **kw)
        assert reads == []  # making a stream reads nothing
        assert torch.equal(whole.load(), want) and whole.total_tokens == whole.num_tokens == want.shape[0]
        rows = []
        for r in range(3):
            reads.clear()
            part = store.stream(SITE, **kw, rank=r, num_ranks=3)
            got = part.load()
            assert reads == [_ident(e) for e in part.entries]  # exactly its own entries, once each
            assert got.shape[0] == part.num_tokens and part.total_tokens == want.shape[0]
            rows.append(got)
        # the shares together hold exactly the selected rows
        key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
        assert key(torch.cat(rows)) == key(want)
    fp = store.stream(SITE).fingerprint()
    assert fp == store.stream(SITE, rank=1, num_ranks=2).fingerprint()  # the data, not the share
    assert fp != store.stream(SITE, max_tokens=300).fingerprint()
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_ranks\)"):
        store.stream(SITE, rank=3, num_ranks=3)
    with pytest.raises(ValueError, match="max_tokens must be a positive int or None, got 0"):
        store.stream(SITE, max_tokens=0)


def test_stream_batches_use_every_token_once_per_epoch_and_any_step_can_be_recomputed(tmp_path):
    # Column 0 of every token holds its own number, so batches can be traced back to tokens.
    w = ActivationWriter(tmp_path, {"c": 1}, shard_bytes=2048)
    n = 0
    for i in range(12):
        x = torch.randn(25, 4)
        x[:, 0] = torch.arange(n, n + 25, dtype=torch.float32)
        n += 25
        w.add(x, site=SiteSpec.parse(SITE), step=0, prompt_id=f"p{i}", label="safe")
        w.finish_prompt(f"p{i}", "safe")
    w.close()
    stream = ActivationStore(tmp_path).stream(SITE)
    batches = StreamBatches(stream, local_batch=20, buffer_tokens=60, seed=3)
    assert batches.per_epoch == 15 and batches.blocks == 5 and batches.buf.shape == (60, 4)
    epochs = [torch.cat([batches(e * 15 + i)[:, 0] for i in range(15)]).long() for e in range(2)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(300))  # each token exactly once per epoch
        assert ids[:20].div(25, rounding_mode="floor").unique().numel() > 1  # a batch mixes entries
    assert not torch.equal(epochs[0], epochs[1])  # each epoch its own order
    # A fresh reader (a resumed run) gives the same batch at any step, reading only what it needs.
    assert torch.equal(StreamBatches(stream, 20, 60, seed=3)(23), batches(23))
    assert not torch.equal(StreamBatches(stream, 20, 60, seed=4)(23), batches(23))
    # A share that fits in the buffer is read once; every epoch is a full shuffle of it.
    whole = StreamBatches(stream, 20, 300, seed=3)
    ids = [torch.cat([whole(e * 15 + i)[:, 0] for i in range(15)]).long() for e in range(2)]
    assert sorted(ids[0].tolist()) == sorted(ids[1].tolist()) == list(range(300))
    assert whole.tensors_read == 12 and not torch.equal(ids[0], ids[1])


# -- training ---------------------------------------------------------------------------------

CFG = dict(num_features=64, k=4, steps=40, batch_size=128, lr=1e-2, log_every=10, memory_budget_mb=1)


def test_streaming_training_trains_deterministically_within_its_buffer(tmp_path):
    store = ActivationStore(write_store(tmp_path / "acts", prompts=80))  # 10240 tokens, d = 32
    cfg = TrainConfig(**CFG)
    data = training_data(store, SITE, cfg)
    assert not isinstance(data, torch.Tensor)  # 10240 x 32 floats with the SAE's work exceed 1 MiB
    buffer = stream_buffer_tokens(data, cfg.resolved(data.d), 128)
    assert 128 <= buffer < data.total_tokens / 3  # several blocks per epoch: refilled while training
    a = train_sae(data, cfg, progress=False)
    b = train_sae(store.stream(SITE), cfg, progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a.sae, name), getattr(b.sae, name)), name
    fvu = [h["fvu"] for h in a.history]
    assert fvu[-1] < 0.6 * fvu[0], fvu
    assert a.data["stream"] == {"num_ranks": 1, "buffer_tokens": buffer} and a.data["num_tokens"] == 10240
    # The scale comes from a pass over every token: E||x s||^2 = d exactly, not on a sample.
    x = store.load(SITE)
    assert float((x.double() * a.activation_scale).pow(2).sum(-1).mean()) == pytest.approx(32, rel=1e-9)
    # Evaluating the stream (a pass, one tensor at a time) equals evaluating the loaded tensor.
    ev, ev_mem = evaluate_sae(a.sae, data), evaluate_sae(a.sae, x)
    assert ev["tokens"] == ev_mem["tokens"] and ev["l0"] == ev_mem["l0"]
    assert ev["fvu"] == pytest.approx(ev_mem["fvu"], rel=1e-9) and ev["fvu"] < 0.5


def test_a_selection_that_fits_the_budget_trains_exactly_as_without_one(tmp_path):
    store = ActivationStore(write_store(tmp_path, prompts=8))
    unbounded = {**CFG, "memory_budget_mb": None, "steps": 10}
    x = training_data(store, SITE, TrainConfig(**{**unbounded, "memory_budget_mb": 64}))
    assert isinstance(x, torch.Tensor) and torch.equal(x, store.load(SITE))
    a = train_sae(x, TrainConfig(**{**unbounded, "memory_budget_mb": 64}), progress=False)
    b = train_sae(store.load(SITE), TrainConfig(**unbounded), progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a.sae, name), getattr(b.sae, name)), name


def test_streaming_resume_continues_exactly(tmp_path):
    store = ActivationStore(write_store(tmp_path / "acts", prompts=80))
    cfg = TrainConfig(**{**CFG, "steps": 20, "checkpoint_every": 5, "log_every": 5})
    straight = train_sae(store.stream(SITE), cfg, checkpoint_dir=tmp_path / "a", progress=False)
    train_sae(store.stream(SITE), TrainConfig(**{**cfg.__dict__, "steps": 10}), checkpoint_dir=tmp_path / "b",
              progress=False)
    resumed = train_sae(store.stream(SITE), cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 10 and [h["step"] for h in resumed.history] == [5, 10, 15, 20]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(straight.sae, name), getattr(resumed.sae, name)), name
    assert resumed.activation_scale == straight.activation_scale
    info = json.loads((tmp_path / "b" / "step-00000020.json").read_text())
    assert info["data"]["stream"] == straight.data["stream"]
    # Another buffer size (or number of processes) means another batch order: refused, and so
    # is resuming a streamed run in memory.
    with pytest.raises(ValueError, match=r"trained streamed by 1 process\(es\) through a buffer of \d+ tokens, "
                                         r"this run would be trained streamed .* the batch order differs"):
        train_sae(store.stream(SITE), TrainConfig(**{**cfg.__dict__, "steps": 25, "memory_budget_mb": 2}),
                  checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"this run would be trained in memory"):
        train_sae(store.load(SITE), TrainConfig(**{**cfg.__dict__, "steps": 25}), checkpoint_dir=tmp_path / "b",
                  progress=False)


def test_a_checkpoint_recording_world_size_resumes_as_num_ranks(tmp_path):
    # Checkpoints written before the DDP side was named by its ranks record "world_size" (top
    # level and in data.stream): they resume exactly, and the next checkpoint records "num_ranks".
    store = ActivationStore(write_store(tmp_path / "acts", prompts=80))
    cfg = TrainConfig(**{**CFG, "steps": 20, "checkpoint_every": 5, "log_every": 5})
    straight = train_sae(store.stream(SITE), cfg, progress=False)
    train_sae(store.stream(SITE), TrainConfig(**{**cfg.__dict__, "steps": 10}), checkpoint_dir=tmp_path / "b",
              progress=False)
    for path in (tmp_path / "b").glob("step-*.json"):
        text = path.read_text()
        assert text.count('"num_ranks": 1') == 2
        path.write_text(text.replace('"num_ranks": 1', '"world_size": 1'))
    resumed = train_sae(store.stream(SITE), cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 10
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(straight.sae, name), getattr(resumed.sae, name)), name
    info = json.loads((tmp_path / "b" / "step-00000020.json").read_text())
    assert info["num_ranks"] == 1 and info["data"]["stream"]["num_ranks"] == 1 and "world_size" not in info


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    store = ActivationStore(write_store(tmp_path, prompts=8))
    with pytest.raises(ValueError, match=r"memory_budget_mb must be set to train from an ActivationStream"):
        train_sae(store.stream(SITE), TrainConfig(**{**CFG, "memory_budget_mb": None}), progress=False)
    with pytest.raises(ValueError, match=r"memory_budget_mb \(--memory-mb\) = 1 is too small: the SAE \(d=32, "
                                         r"F=4096\) .* expected at least \d+"):
        train_sae(store.stream(SITE), TrainConfig(**{**CFG, "num_features": 4096}), progress=False)
    with pytest.raises(ValueError, match=r"data is share 1 of 2 of a stream, but this is process 0 of 1"):
        train_sae(store.stream(SITE, rank=1, num_ranks=2), TrainConfig(**CFG), progress=False)
    with pytest.raises(ValueError, match=r"batch_size 2048 exceeds the number of training tokens 1024"):
        train_sae(store.stream(SITE), TrainConfig(**{**CFG, "batch_size": 2048}), progress=False)
    with pytest.raises(ValueError, match=r"memory_budget_mb must be a positive int \(MiB\), got 0"):
        TrainConfig(memory_budget_mb=0).check()
    # 16 entries of 64 tokens dealt to 6 processes: two get only 2 entries. Every process sees
    # every share's size in the manifest, so all refuse alike (none is left waiting in a collective).
    for rank in (0, 4, 5):
        share = store.stream(SITE, rank=rank, num_ranks=6)
        assert share.share_tokens == [192, 192, 192, 192, 128, 128] and share.num_tokens == share.share_tokens[rank]
        with pytest.raises(ValueError, match=r"process 4 of 6 holds 128 tokens of the stream, fewer than its part "
                                             r"of a batch \(150 = batch_size / processes\)"):
            StreamBatches(share, local_batch=150, buffer_tokens=1000, seed=0)


# -- peak memory, measured in a subprocess ----------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""\
    import json, sys
    import torch
    import tqdm.auto  # train_sae imports it: part of the baseline, not of the data
    from safedig_kernels.workflow.store import ActivationStore
    from safedig_kernels.workflow.train import TrainConfig, evaluate_sae, train_sae, training_data

    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    torch.set_num_threads(1)
    # Creating the first Adam optimizer imports ~70 MB of torch modules (dynamo); a tiny run
    # pays for it, and for other one-time imports, before the baseline. It holds no data.
    train_sae(torch.randn(64, 16), TrainConfig(num_features=32, k=2, steps=2, batch_size=16), progress=False)
    base = kib("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0); else it stays conservative
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    budget = None if sys.argv[2] == "none" else int(sys.argv[2])
    cfg = TrainConfig(num_features=256, k=8, steps=30, batch_size=256, lr=3e-3, log_every=10, memory_budget_mb=budget)
    store = ActivationStore(sys.argv[1])
    data = training_data(store, "single_transformer_blocks.0", cfg)
    result = train_sae(data, cfg, progress=False)
    ev = evaluate_sae(result.sae, data)
    print(json.dumps({"increase_mib": (kib("VmHWM") - base) / 1024, "streamed": not isinstance(data, torch.Tensor),
                      "fvu": [h["fvu"] for h in result.history], "eval_fvu": ev["fvu"], "data": result.data}))
""")


def _peak(tmp_path: Path, store: Path, budget: str) -> dict:
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(store), budget], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc")
def test_peak_memory_stays_within_the_budget_on_a_store_six_times_larger(tmp_path):
    budget = 16
    # 400 prompts x 2 steps x 256 tokens x d = 256 in bfloat16: 100 MiB on disk, 200 MiB as float32.
    store = write_store(tmp_path / "acts", prompts=400, tokens=256, d=256, atoms=64, shard_bytes=8 << 20, distinct=64)
    on_disk = sum(p.stat().st_size for p in store.iterdir()) / MiB
    assert on_disk >= 6 * budget
    streamed = _peak(tmp_path, store, str(budget))
    assert streamed["streamed"] and streamed["data"]["stream"]["buffer_tokens"] < streamed["data"]["num_tokens"] / 10
    # Everything the process added while opening the store, training and evaluating, over the warm
    # baseline: the budget, plus 4 MiB for the store's index of 800 entries (~1.6 MiB, held by any
    # reader) and run-to-run allocator noise (~1 MiB). Measured: 15.5 to 17.8 MiB.
    assert streamed["increase_mib"] <= budget + 4, (streamed["increase_mib"], budget, on_disk)
    assert streamed["fvu"][-1] < 0.6 * streamed["fvu"][0] and streamed["eval_fvu"] < 0.6
    # The same measurement sees the data when it is loaded: without a budget the increase
    # exceeds the store's float32 size.
    loaded = _peak(tmp_path, store, "none")
    assert not loaded["streamed"] and loaded["increase_mib"] >= 2 * on_disk, loaded["increase_mib"]


# -- DDP --------------------------------------------------------------------------------------

def _ddp_worker(rank: int, num_ranks: int, init_file: str, store_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        seen = []
        real = store_mod.ActivationStream._read_run

        def spy(self, run):
            seen.extend(_ident(e) for e in run)
            yield from real(self, run)

        store_mod.ActivationStream._read_run = spy
        store = ActivationStore(store_dir)
        results = []
        for _ in range(2):  # twice, from scratch: the weights must not change
            data = training_data(store, SITE, TrainConfig(**CFG))
            results.append(train_sae(data, TrainConfig(**CFG), progress=False))
        ev = evaluate_sae(results[0].sae, data)  # every rank, over its share, all-reduced
        Path(out, f"reads{rank}.json").write_text(json.dumps({"reads": sorted(set(seen)), "share": [
            _ident(e) for e in data.entries], "tokens": data.num_tokens, "eval": ev}))
        if rank == 0:
            for i, r in enumerate(results):
                save_file({n: getattr(r.sae, n).contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
                          str(Path(out, f"run{i}.safetensors")), metadata={"history": json.dumps(r.history)})
        dist.barrier()  # leave together: tearing gloo down while the peer still works can abort it
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_read_disjoint_shares_and_train_deterministically(tmp_path):
    store_dir = write_store(tmp_path / "acts", prompts=80)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(store_dir), str(out)), nprocs=2, join=True)
    got = [json.loads((out / f"reads{r}.json").read_text()) for r in range(2)]
    everything = {_ident(e) for e in ActivationStore(store_dir).entries(SITE)}
    shares = [{tuple(i) for i in g["share"]} for g in got]
    reads = [{tuple(i) for i in g["reads"]} for g in got]
    assert reads == shares and not reads[0] & reads[1] and reads[0] | reads[1] == everything
    assert got[0]["tokens"] + got[1]["tokens"] == 10240 and got[0]["tokens"] < 10240
    assert got[0]["eval"] == got[1]["eval"] and got[0]["eval"]["tokens"] == 10240  # all-reduced
    runs = [load_file(str(out / f"run{i}.safetensors")) for i in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    # It trains. Each process shuffles only its own share, so the global batches, hence the
    # weights, differ from the single-process streaming run's; the quality does not.
    ddp_eval = got[0]["eval"]["fvu"]
    single = train_sae(ActivationStore(store_dir).stream(SITE), TrainConfig(**CFG), progress=False)
    single_eval = evaluate_sae(single.sae, ActivationStore(store_dir).stream(SITE))["fvu"]
    assert ddp_eval < 0.5 and abs(ddp_eval - single_eval) < 0.1, (ddp_eval, single_eval)


# -- the command ------------------------------------------------------------------------------

def test_safedig_train_streams_past_memory_mb_and_is_unchanged_below_it(tmp_path, capsys):
    from safedig_kernels import TopKSAE

    acts = write_store(tmp_path / "acts", prompts=80)
    base = ["train", "--activations", str(acts), "--site", SITE, "--features", "64", "--k", "4", "--steps", "30",
            "--batch-size", "128", "--lr", "1e-2", "--no-progress", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "plain.safetensors")]) == 0
    assert main([*base, "--memory-mb", "512", "--out", str(tmp_path / "fits.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "streaming" not in out
    plain, fits = TopKSAE.load(tmp_path / "plain.safetensors"), TopKSAE.load(tmp_path / "fits.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(plain, name), getattr(fits, name)), name

    assert main([*base, "--memory-mb", "1", "--metrics", str(tmp_path / "m.json"), "--out",
                 str(tmp_path / "streamed.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "do not fit in --memory-mb 1: streaming them from the shards" in out
    assert "streamed through a buffer of" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["tokens"] == 10240 and m["streamed"]["num_ranks"] == 1 and m["eval"]["fvu"] < 0.6
    assert TopKSAE.load(tmp_path / "streamed.safetensors").metadata.site == SITE
