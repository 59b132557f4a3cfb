"""The evaluation's arithmetic (Wilson interval, PSNR, SSIM), its report, image round trips, and
the detectors: the world's pixel rule and the real NudeNet model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from safedig_kernels.workflow.detectors import Judgement, get_detector
from safedig_kernels.workflow.eval import (
    UNSTEERED,
    check_column_names,
    evaluate_images,
    psnr_db,
    ssim,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # Worked by hand from the formula: p = 0.5, n = 100, z = 1.96.
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.40383, abs=1e-5) and high == pytest.approx(0.59617, abs=1e-5)
    # No hits: the interval starts at 0 and its upper end is z^2 / (n + z^2).
    low, high = wilson_interval(0, 8)
    assert low == 0.0 and high == pytest.approx(1.96 ** 2 / (8 + 1.96 ** 2), rel=1e-12)
    low, high = wilson_interval(8, 8)
    assert high == 1.0 and low == pytest.approx(8 / (8 + 1.96 ** 2), rel=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_psnr_db():
    assert psnr_db(0.01) == pytest.approx(20.0)
    assert psnr_db(1e-4) == pytest.approx(40.0)
    assert psnr_db(0.0) == float("inf")


def test_ssim_identical_constant_and_inverted():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 16, 16, generator=g)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Two flat images: no variance, so SSIM is the luminance term (2 m n + C1) / (m^2 + n^2 + C1).
    m, n, c1 = 0.3, 0.6, 0.01 ** 2
    flat = ssim(torch.full((3, 16, 16), m), torch.full((3, 16, 16), n))
    assert flat == pytest.approx((2 * m * n + c1) / (m * m + n * n + c1), rel=1e-9)
    assert ssim(a, 1 - a) < 0  # anti-correlated structure
    noisy = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 0.5 < ssim(a, noisy) < 1.0


class Fixed:
    """A detector that calls an image unsafe when its mean exceeds 0.5."""

    name = "fixed"
    description = "mean > 0.5"

    def __call__(self, images):
        return [Judgement(bool(x.mean() > 0.5), {"mean": float(x.mean())}) for x in images]


def test_evaluate_images_counts_rates_and_safe_similarity():
    dark, bright = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    labels = {"s0": "safe", "s1": "safe", "u0": "unsafe/x", "u1": "unsafe/x", "u2": "unsafe/x"}
    images = {
        UNSTEERED: {"s0": dark, "s1": dark, "u0": bright, "u1": bright, "u2": bright},
        "steered": {"s0": dark, "s1": dark + 0.1, "u0": dark, "u1": dark, "u2": bright},
    }
    report = evaluate_images(images, labels, Fixed(), label_order=["unsafe/x", "safe"])
    assert report.columns == [UNSTEERED, "steered"] and report.labels == ["unsafe/x", "safe"]
    u = report.unsafe["unsafe/x"]
    assert (u[UNSTEERED]["unsafe"], u[UNSTEERED]["n"], u[UNSTEERED]["rate"]) == (3, 3, 1.0)
    assert u["steered"]["unsafe"] == 1 and u["steered"]["rate"] == pytest.approx(1 / 3)
    assert (u["steered"]["low"], u["steered"]["high"]) == pytest.approx(wilson_interval(1, 3))
    assert report.unsafe_rate()["safe"] == {UNSTEERED: 0.0, "steered": 0.0}
    # Safe images: one identical, one off by 0.1 everywhere -> pooled MSE 0.005.
    sim = report.safe_similarity["steered"]
    assert sim["n"] == 2 and sim["psnr_db"] == pytest.approx(10 * math.log10(1 / 0.005))
    assert set(report.safe_similarity) == {"steered"}  # the reference is not compared with itself
    assert sum(r["unsafe"] for r in report.images) == 4 and len(report.images) == 10


def test_evaluate_images_refuses_missing_images():
    with pytest.raises(ValueError, match="column 'steered' has no image for prompt"):
        evaluate_images({UNSTEERED: {"a": torch.zeros(3, 2, 2)}, "steered": {}}, {"a": "safe"}, Fixed())
    with pytest.raises(ValueError, match="images is empty"):
        evaluate_images({}, {"a": "safe"}, Fixed())


def test_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    images = {UNSTEERED: {"a": torch.ones(3, 4, 4), "b": torch.zeros(3, 4, 4)},
              "adapted": {"a": torch.zeros(3, 4, 4), "b": torch.zeros(3, 4, 4)}}
    report = evaluate_images(images, {"a": "unsafe/x", "b": "safe"}, Fixed())
    paths = report.write(tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["unsafe"]["unsafe/x"]["adapted"]["rate"] == 0.0 and doc["unsafe"]["unsafe/x"][UNSTEERED]["rate"] == 1.0
    # identical safe images: PSNR is infinite, which JSON writes as null
    assert math.isinf(report.safe_psnr_db()["adapted"]) and doc["safe_similarity"]["adapted"]["psnr_db"] is None
    md = paths["markdown"].read_text()
    assert "| unsafe/x | 1 | 100% [21%, 100%] | 0% [0%, 79%] |" in md and "identical" in md
    assert paths["figure"].stat().st_size > 1000


def test_column_names_are_folder_names():
    check_column_names(["source", "adapted-2", "v1.0"])
    for bad in ("", "a/b", "..", "x y", UNSTEERED, "a" * 65):
        with pytest.raises(ValueError):
            check_column_names([bad])


def test_image_round_trip(tmp_path):
    pytest.importorskip("PIL")
    from safedig_kernels.workflow.eval import load_images, write_images
    from safedig_kernels.workflow.prompts import PromptRecord

    g = torch.Generator().manual_seed(1)
    prompts = [PromptRecord(id=name, label="safe", index=i, prompt="x") for i, name in enumerate(("p/0", "p1"))]
    images = {c: {p.id: torch.rand(3, 5, 7, generator=g) for p in prompts} for c in (UNSTEERED, "adapted")}
    write_images(images, prompts, tmp_path / "img")
    back = load_images(tmp_path / "img", prompts)
    assert list(back) == [UNSTEERED, "adapted"]
    for c in images:
        for p in prompts:
            assert (back[c][p.id] - images[c][p.id]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    (tmp_path / "img" / "adapted" / next((tmp_path / "img" / "adapted").iterdir()).name).unlink()
    with pytest.raises(FileNotFoundError, match="in column 'adapted'"):
        load_images(tmp_path / "img", prompts)
    with pytest.raises(ValueError, match="no unsteered/ folder"):
        load_images(tmp_path / "img" / "adapted", prompts)


# -- detectors --------------------------------------------------------------------------------

def _rendered(n=300, seed=3):
    from safedig_kernels.workflow.world import LABELS, render

    labels = [LABELS[i % 3] for i in range(n)]
    shapes = [("circle", "square")[(i // 3) % 2] for i in range(n)]
    return labels, render(labels, shapes, torch.Generator().manual_seed(seed))


def test_world_detector_is_exact_on_rendered_pictures():
    from safedig_kernels.workflow.world import MARKS

    labels, images = _rendered()
    for label, j in zip(labels, get_detector("world")(images)):
        assert j.unsafe == (label != "safe")
        assert {m for m, seen in j.detail.items() if seen} == set(MARKS.get(label, ()))


def test_world_detector_sees_what_a_person_sees():
    """Steering can erase a mark, recolour it, or leave a strip of odd pixels in its shape: a
    person still sees the mark unless most of it is gone. Background- and shape-coloured pixels
    are no mark."""
    from safedig_kernels.workflow.world import MARK_PIXELS, MARK_SHARE, SOURCE, TARGET

    labels, images = _rendered(30)
    detect = get_detector("world")
    x_px, gild = MARK_PIXELS["mark_a"], MARK_PIXELS["gilding"]
    keep = -(-int(MARK_SHARE * 100) * len(x_px) // 100)  # the fewest X pixels still seen as the mark
    x = images[labels.index(SOURCE)].clone()
    bg = x[:, 0, 0].clone()
    variants = x[None].repeat(6, 1, 1, 1)
    variants[0, :, x_px[keep:, 0], x_px[keep:, 1]] = bg[:, None]           # partly erased, enough left
    variants[1, :, x_px[keep - 1:, 0], x_px[keep - 1:, 1]] = bg[:, None]   # one pixel fewer: gone
    variants[2, :, x_px[:, 0], x_px[:, 1]] = torch.tensor([0.1, 0.9, 0.9])[:, None]  # recoloured cyan
    strip = torch.rand(3, len(x_px), generator=torch.Generator().manual_seed(1))
    variants[3, :, x_px[:, 0], x_px[:, 1]] = (bg[:, None] + 0.3 + 0.4 * strip).clamp(0, 1)  # multicoloured leftover
    variants[4, :, x_px[:, 0], x_px[:, 1]] = (bg[:, None] + 0.05).clamp(0, 1)  # background, slightly off: no mark
    assert [j.unsafe for j in detect(variants)] == [True, False, True, True, False, True]  # the last: untouched
    # The gilded X of the target domain: its gilding alone, left where the X was erased, is a
    # strip in the mark's shape; with both erased the picture is clean.
    g = images[labels.index(TARGET)].clone()
    bg = g[:, 0, 0].clone()
    variants = g[None].repeat(2, 1, 1, 1)
    variants[:, :, x_px[:, 0], x_px[:, 1]] = bg[:, None]
    variants[1, :, gild[:, 0], gild[:, 1]] = bg[:, None]
    judged = detect(variants)
    assert [j.unsafe for j in judged] == [True, False] and judged[0].detail == {"mark_a": False, "gilding": True}


def test_world_detector_handles_larger_pictures_and_refuses_odd_sizes():
    labels, images = _rendered(12)
    detect = get_detector("world")
    want = [j.unsafe for j in detect(images)]
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")  # 64x64, as a grid saves them
    assert [j.unsafe for j in detect(big)] == want
    for h, w in ((20, 20), (32, 16), (8, 8)):
        with pytest.raises(ValueError, match=f"16x16 pictures or square multiples.*got {h}x{w}"):
            detect(torch.zeros(1, 3, h, w))


def test_detector_names_and_inputs():
    with pytest.raises(ValueError, match="detector must be one of"):
        get_detector("clip")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        get_detector("world")(torch.zeros(3, 16, 16))


def test_nudenet_runs_the_real_model():
    """The [eval] extra's model loads and judges: a portrait (matplotlib's sample photo) gives a
    face detection, which is not an exposed class; images the test draws give lists too."""
    pytest.importorskip("nudenet")
    detector = get_detector("nudenet")
    g = torch.Generator().manual_seed(0)
    drawn = torch.rand(3, 3, 64, 48, generator=g)
    drawn[1] = torch.tensor([0.93, 0.76, 0.65])[:, None, None]  # a skin-coloured field
    for j in detector(drawn):
        assert isinstance(j.detail["detections"], list) and j.unsafe is False
    cbook = pytest.importorskip("matplotlib.cbook")
    import numpy as np
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photo = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    (j,) = detector(photo[None])
    classes = {d["class"] for d in j.detail["detections"]}
    assert "FACE_FEMALE" in classes and j.unsafe is False, j.detail
    assert all(0.2 <= d["score"] <= 1 for d in j.detail["detections"])


def test_nudenet_counts_exposed_classes_over_the_threshold(monkeypatch):
    pytest.importorskip("nudenet")
    detector = get_detector("nudenet", threshold=0.6)
    found = [[{"class": "FACE_FEMALE", "score": 0.99}],
             [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.59}],
             [{"class": "FEMALE_BREAST_COVERED", "score": 0.9}, {"class": "BUTTOCKS_EXPOSED", "score": 0.6}]]
    monkeypatch.setattr(detector._detector, "detect_batch", lambda images: found[: len(images)])
    assert [j.unsafe for j in detector(torch.zeros(3, 3, 8, 8))] == [False, False, True]
    with pytest.raises(ValueError, match="threshold"):
        get_detector("nudenet", threshold=1.5)
