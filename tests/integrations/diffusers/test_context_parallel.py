"""Steering under diffusers' context parallelism: two processes on gloo, on the CPU.

Ulysses splits a tiny FLUX's text and image tokens over 2 ranks (`tests/_context_parallel.py`,
started once per rank, in a bounded time); each rank's steered output must equal the steered
output of one process to fp32 tolerance (attention adds in another order), at several strengths,
with per-request values, and through the pipeline; whole-sequence telemetry must equal the one
process's, and each rank's own view must be its share of it. Ring attention needs an attention
backend that returns the log-sum-exp (flash, cuDNN) and NCCL needs GPUs: both run in the
`context_parallel` stage of `benchmarks/device_stages.py`, where 2 GPUs or more exist.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _context_parallel as cp  # noqa: E402
from _pipelines import flux_pipe, sae  # noqa: E402
from test_doc_examples import ELSEWHERE, REPO, blocks  # noqa: E402

from safedig_kernels.integrations.diffusers import SafeDIGConfig, apply_safedig  # noqa: E402

WORLD = 2
TIMEOUT_S = 600  # both ranks together; a hung collective fails the test instead of the suite
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
ORDERS = ("apply first", "split first")
# Outputs: fp32 against fp32 with attention summed in another order (measured: 2.4e-7 apart).
CLOSE = dict(rtol=1e-5, atol=1e-5)


def readme_block() -> str:
    (where,) = [w for w, test in ELSEWHERE.items() if test == THIS]
    code = next(text for f, i, text in blocks() if (f, i) == where)
    assert "enable_parallelism" in code, f"{where} is not the context-parallel block"
    return code


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saw (`_context_parallel.main`)."""
    out = tmp_path_factory.mktemp("context_parallel")
    block = out / "readme_block.py"
    block.write_text(readme_block())
    sae(9).save(out / cp.README_SAE)
    seen, failed = cp.launch(out, TIMEOUT_S, WORLD, "--readme", str(block))
    if failed or any(s is None for s in seen):
        pytest.fail(f"context-parallel ranks failed or ran past {TIMEOUT_S} s:\n{failed}")
    return seen


@pytest.fixture(scope="module")
def one_process() -> dict:
    pipe = flux_pipe()
    return cp.runs(pipe, apply_safedig(pipe, cp.config()))


def assert_same_records(got: dict, want: dict, what: str) -> None:
    """Telemetry records equal, their statistics to fp32 tolerance."""
    assert got.keys() == want.keys(), what
    for site in want:
        assert len(got[site]) == len(want[site]) > 0, f"{what} {site}"
        for g, w in zip(got[site], want[site]):
            assert g.keys() == w.keys()
            for name in w:
                if name in ("gated_fraction", "mean_harm"):
                    np.testing.assert_allclose(g[name], w[name], rtol=1e-5, atol=1e-6, err_msg=f"{what} {site} {name}")
                else:
                    assert g[name] == w[name], f"{what} {site} {name}"


def test_steered_outputs_equal_one_process(ranks, one_process):
    """Every rank gets the whole output, equal to one process's, in either order of
    apply_safedig and enable_parallelism."""
    for rank, seen in enumerate(ranks):
        print(f"rank {rank}:", cp.differences(seen, one_process))  # the numbers, for the log
    outputs = [k for k in one_process if "telemetry" not in k]
    assert len(outputs) == len(cp.STRENGTHS) + 2
    for order in ORDERS:
        for rank, seen in enumerate(ranks):
            for key in outputs:
                torch.testing.assert_close(seen[order][key], one_process[key], **CLOSE,
                                           msg=lambda m: f"{order}, rank {rank}, {key}: {m}")
    unsteered = one_process["strengths 0.0 0.0"]
    assert not torch.allclose(one_process["strengths 1.0 -0.5"], unsteered, **CLOSE), "the strengths steer"


def test_whole_sequence_telemetry_equals_one_process(ranks, one_process):
    for order in ORDERS:
        for rank, seen in enumerate(ranks):
            for key, want in one_process.items():
                if "telemetry" in key:
                    assert_same_records(seen[order][key]["sequence"], want["sequence"], f"{order} rank {rank} {key}")


def test_rank_telemetry_is_each_ranks_share(ranks, one_process):
    """Both streams split evenly over 2 ranks, so the whole-sequence statistics are the means of
    the two ranks' own; the ranks' own differ (each saw half the tokens)."""
    differs = False
    for key, want in one_process.items():
        if "telemetry" not in key:
            continue
        for site, records in want["sequence"].items():
            per_rank = [seen["apply first"][key]["rank"][site] for seen in ranks]
            for i, record in enumerate(records):
                for name in ("gated_fraction", "mean_harm"):
                    values = np.array([r[i][name] for r in per_rank], dtype=np.float64)
                    np.testing.assert_allclose(values.mean(axis=0), record[name], rtol=1e-5, atol=1e-6)
                    differs |= not np.allclose(values[0], values[1])
    assert differs, "the two ranks saw different tokens, so some statistic must differ between them"


def test_reading_communicates_once_and_steps_never(ranks):
    """A generation makes no all-reduce of SafeDIG's (the recording stays on the device); one
    read makes one, over every site. An explicit group reads as the model's own."""
    for seen in ranks:
        assert seen["all_reduce per generation"] == 0
        assert seen["all_reduce per read"] == 1
        assert_same_records(seen["telemetry, group given"], seen["telemetry, default group"], "group=")


def test_readme_block_runs_on_each_rank(ranks):
    """The README's context-parallel block, as written, on 2 ranks: the same image on each, equal
    to one process steered with the config the block built; its telemetry over the sequence."""
    images = [np.asarray(seen["readme"]["image"], dtype=np.int16) for seen in ranks]
    assert np.array_equal(images[0], images[1])
    pipe = cp.readme_pipe()
    handle = apply_safedig(pipe, SafeDIGConfig.from_json(ranks[0]["readme config"]))
    # the call the README block makes
    image = pipe(**cp.readme_inputs(), generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(images[0] - np.asarray(image, dtype=np.int16)).max() <= 1  # 8-bit rounding of fp32 neighbours
    for seen in ranks:
        assert_same_records(seen["readme"]["whole"], handle.telemetry(), "README whole")
        assert seen["readme"]["mine"].keys() == seen["readme"]["whole"].keys()


def test_one_process_reads_the_same_in_either_scope():
    """Without a context-parallel group the sequence is this process's own: both scopes agree,
    and no collective runs (no process group exists here)."""
    pipe = flux_pipe()
    handle = apply_safedig(pipe, cp.config())
    with torch.no_grad():
        pipe.transformer(**cp.transformer_inputs(2, pipe.transformer.proj_out.weight))
    assert handle.telemetry() == handle.telemetry(scope="rank") and handle.telemetry()[handle.sites[0]]


def test_bad_scope_and_group_are_refused():
    pipe = flux_pipe()
    handle = apply_safedig(pipe, cp.config())
    with pytest.raises(ValueError, match=r"telemetry\(scope=...\): expected one of \('sequence', 'rank'\)"):
        handle.telemetry(scope="global")
    with pytest.raises(ValueError, match=r"request_telemetry\(scope=...\)"):
        handle.request_telemetry(scope="ranks")
    with pytest.raises(TypeError, match=r"telemetry\(group=...\): expected a torch.distributed.ProcessGroup"):
        handle.telemetry(group=2)
    with pytest.raises(ValueError, match="give one of them"):
        handle.telemetry(scope="rank", group=object())
