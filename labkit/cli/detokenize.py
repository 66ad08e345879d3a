"""`labkit detokenize`: turn saved features into a PNG with a trained (or the released) de-tokenizer."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from labkit.core.atomic import write_bytes
from labkit.core.errors import LabError, ParameterError
from labkit.core.presets import Preset, get_preset


def read_features(path: Path | str) -> torch.Tensor:
    """A [N, D] or [B, N, D] float tensor from a .pt file (a tensor, or a dict with 'features') or a .safetensors
    file (key 'features')."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"{path}: not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            payload = load_file(str(path))
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's to fix: say which and why
        raise LabError(f"{path}: cannot read features ({type(error).__name__}: {error})") from None
    features = payload.get("features") if isinstance(payload, dict) else payload
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise LabError(f"{path}: expected a float tensor (or a dict with a 'features' tensor)")
    return features.float().unsqueeze(0) if features.ndim == 2 else features.float()


def load_detokenizer(preset: Preset, folder: Path | str | None = None):
    """The de-tokenizer `detokenize` uses: a named folder, else the preset's stage-3 official / stage-1 artifact."""
    from labkit.core.artifacts import locate_artifact
    from labkit.training.stage1 import NAME, load_detokenizer_artifact, load_stage1_detokenizer

    if preset.pretrained_weights and folder is None:
        from labkit.core.paths import weights_folder
        from labkit.models.official_checkpoint import load_official_detokenizer

        return load_official_detokenizer(weights_folder(), "adapted")[0]
    if folder is not None:
        folder = Path(folder)
        from labkit.core.artifacts import read_manifest

        stage = read_manifest(folder).get("stage", "stage1")
        return load_detokenizer_artifact(folder, preset, stage=stage)[0]
    adapted = locate_artifact(f"{NAME}_official", preset.name)
    if adapted is not None:
        return load_detokenizer_artifact(adapted, preset, stage="stage3")[0]
    return load_stage1_detokenizer(preset)


def detokenize_file(
    features: Path | str,
    out: Path | str,
    preset: str = "tiny",
    folder: Path | str | None = None,
    steps: int = 10,
    guidance_scale: float = 3.0,
    seed: int = 42,
    progress: bool = True,
) -> Path:
    config = get_preset(preset)
    if steps < 1:
        raise ParameterError("--steps", f"must be >= 1 (got {steps})")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ParameterError("--out", f"must name a .png file (got {out})")
    tensor = read_features(features)
    expected = (config.visual_tokenizer.num_features, config.visual_tokenizer.feature_dim)
    if tensor.ndim != 3 or tuple(tensor.shape[1:]) != expected:  # checked before loading (SDXL takes minutes)
        raise LabError(
            f"{features}: expected features of shape [batch, {expected[0]}, {expected[1]}] (or [{expected[0]}, "
            f"{expected[1]}]) for the {preset} de-tokenizer, got {list(tensor.shape)}"
        )
    model = load_detokenizer(config, folder)
    images = model.sample(tensor, steps=steps, guidance_scale=guidance_scale, seed=seed, progress=progress)
    from PIL import Image

    strip = torch.cat(list(images), dim=-1).permute(1, 2, 0).numpy()  # side by side
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG")
    write_bytes(out, buffer.getvalue())
    return out
