"""Decoder-only adaptation: encoder bit-identical, target error down, replay and proximity do their jobs."""
from __future__ import annotations

import pytest
import torch
from _workflow import orthonormal_basis, orthonormal_sae

from safedig_kernels.workflow.adapt import AdaptConfig, adapt_decoder

D = 16


def _tokens(D_rows: torch.Tensor, n: int, offset: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    c = torch.zeros(n, D)
    for i in range(n):
        c[i, torch.randperm(D, generator=g)[:3]] = 1 + torch.rand(3, generator=g)
    return c @ D_rows + offset


@pytest.fixture(scope="module")
def domains():
    """Source tokens use the SAE's own dictionary; target tokens use a slightly rotated one and
    an offset, so the frozen encoder still finds the features but the decoder is off."""
    Q = orthonormal_basis(D, seed=0)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=g)
    R = torch.linalg.matrix_exp(0.15 * (A - A.t()))
    source = _tokens(Q.t(), 1024, torch.zeros(D), g)
    target = _tokens(Q.t() @ R, 1024, 0.3 * torch.randn(D, generator=g), g)
    return orthonormal_sae(Q, k=3), source, target


CFG = dict(steps=120, batch_size=256, lr=1e-2)


def test_encoder_bit_identical_and_target_error_falls(domains):
    sae, source, target = domains
    sae.set_harmful([4])
    sae.set_strengths(beta=0.5, gamma=1.0)
    r = adapt_decoder(sae, target, source, AdaptConfig(**CFG), progress=False)
    out = r.sae
    assert torch.equal(out.W_enc, sae.W_enc) and torch.equal(out.b_enc, sae.b_enc)
    assert out.W_enc.dtype == sae.W_enc.dtype and out.W_enc.data_ptr() != sae.W_enc.data_ptr()
    assert not torch.equal(out.W_dec, sae.W_dec) and not torch.equal(out.b_dec, sae.b_dec)
    m = r.metrics
    assert m["fvu_target_after"] < 0.6 * m["fvu_target_before"]
    assert out.metadata.harmful_features == [4] and float(out.beta) == 0.5 and float(out.gamma) == 1.0
    assert out.metadata.extra["adapt"]["replay"] == 0.2


def test_replay_protects_source_and_proximity_limits_change(domains):
    sae, source, target = domains
    no_replay = adapt_decoder(sae, target, source, AdaptConfig(**CFG, replay=0.0), progress=False).metrics
    replay = adapt_decoder(sae, target, source, AdaptConfig(**CFG, replay=0.5), progress=False).metrics
    assert replay["fvu_source_after"] < no_replay["fvu_source_after"]
    tight = adapt_decoder(sae, target, source, AdaptConfig(**CFG, prox_coef=10.0), progress=False).metrics
    loose = adapt_decoder(sae, target, source, AdaptConfig(**CFG, prox_coef=0.0), progress=False).metrics
    assert tight["decoder_change"] < 0.5 * loose["decoder_change"]


def test_frozen_b_dec_keeps_codes(domains):
    sae, source, target = domains
    out = adapt_decoder(sae, target, None, AdaptConfig(**CFG, train_b_dec=False), progress=False).sae
    assert torch.equal(out.b_dec, sae.b_dec)
    v0, i0 = sae.encode(target)
    v1, i1 = out.encode(target)
    assert torch.equal(i0, i1) and torch.equal(v0, v1)


def test_bfloat16_encoder_stays_bitwise():
    sae = orthonormal_sae(orthonormal_basis(D, seed=2), k=2).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, D, generator=g)
    out = adapt_decoder(sae, x, None, AdaptConfig(steps=5, batch_size=64), progress=False).sae
    assert out.dtype == torch.bfloat16 and torch.equal(out.W_enc, sae.W_enc) and torch.equal(out.b_enc, sae.b_enc)


def test_clear_errors(domains):
    sae, source, target = domains
    with pytest.raises(ValueError, match=r"target must be a non-empty \[N, d\] tensor with d = 16"):
        adapt_decoder(sae, target[:, :8], source, progress=False)
    with pytest.raises(ValueError, match=r"replay must lie in \[0, 1\)"):
        AdaptConfig(replay=1.0)
    with pytest.raises(ValueError, match="exceeds the number of training tokens"):
        adapt_decoder(sae, target[:10], source, AdaptConfig(batch_size=256), progress=False)


def test_default_batch_fits_a_capture_smaller_than_it(domains, caplog):
    """A capture of fewer tokens than the default batch (4096) still adapts: the default takes
    the largest batch whose target and replayed source shares both fit, and says so."""
    import logging

    from safedig_kernels.workflow.adapt import DEFAULT_BATCH_SIZE, fitting_batch_size

    sae, source, target = domains
    assert AdaptConfig().batch_size is None
    small_t, small_s = target[:300], source[:40]
    with caplog.at_level(logging.INFO, logger="safedig_kernels.workflow.adapt"):
        r = adapt_decoder(sae, small_t, small_s, AdaptConfig(steps=30, lr=1e-2), progress=False)
    b = r.metrics["batch_size"]
    # replay 0.2 of the batch comes from 40 source tokens: round(0.2 b) <= 40, and b - round(0.2 b) <= 300
    assert b == fitting_batch_size(300, 40, 0.2) == 202 and b < DEFAULT_BATCH_SIZE
    assert r.sae.metadata.extra["adapt"]["batch_size"] == b
    assert r.metrics["fvu_target_after"] < r.metrics["fvu_target_before"]
    assert any("batch size 202" in m for m in caplog.messages), caplog.messages
    # without a source, the target alone bounds it; with plenty of data the default stays 4096
    assert adapt_decoder(sae, small_t, None, AdaptConfig(steps=2), progress=False).metrics["batch_size"] == 300
    assert fitting_batch_size(10_000, 10_000, 0.2) == DEFAULT_BATCH_SIZE
    for n_t, n_s, replay in ((7, 100, 0.5), (1000, 3, 0.2), (5, None, 0.2), (1, 1, 0.2)):
        b = fitting_batch_size(n_t, n_s, replay)
        n_src = round(replay * b) if n_s is not None else 0
        assert b - n_src <= n_t and (n_s is None or n_src <= n_s)
        # the largest: one more token would not fit
        n_src1 = round(replay * (b + 1)) if n_s is not None else 0
        assert b + 1 - n_src1 > n_t or (n_s is not None and n_src1 > n_s)
    # an explicit batch size that does not fit is still an error, naming the numbers
    with pytest.raises(ValueError, match=r"batch_size 512 takes 410 target tokens per batch .* target \(300\)"):
        adapt_decoder(sae, small_t, small_s, AdaptConfig(steps=1, batch_size=512), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
        AdaptConfig(batch_size=0)


def test_full_finetune_moves_the_encoder_too(domains):
    """The baseline the demo compares with: the same fit with the encoder trained as well."""
    from safedig_kernels.workflow.adapt import finetune_sae

    sae, source, target = domains
    r = finetune_sae(sae, target, source, AdaptConfig(**CFG), progress=False)
    assert not torch.equal(r.sae.W_enc, sae.W_enc) and not torch.equal(r.sae.W_dec, sae.W_dec)
    assert r.metrics["fvu_target_after"] < r.metrics["fvu_target_before"]
    assert r.sae.metadata.extra["adapt"]["train_encoder"] is True
    frozen = adapt_decoder(sae, target, source, AdaptConfig(**CFG), progress=False)
    assert frozen.sae.metadata.extra["adapt"]["train_encoder"] is False
