"""Presets: one code path at three scales (DESIGN §2).

`tiny` runs on a 2-core laptop CPU, `small` on one 24 GB GPU, `paper` is the published configuration
(Llama-2-7B, 448 px ViT, 1024 px SDXL) and reads real weights from a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParameterError


@dataclass(frozen=True)
class DataPreset:
    """The StoryStream-mini data set a preset trains and evaluates on."""

    image_size: int  # frames are rendered at this size (pixels, square)
    frames: int  # frames per story (StoryStream: 30)
    train_stories: int
    val_stories: int
    test_stories: int
    chunk_length: int  # training chunks (official: 10)
    bpe_merges: int  # tokens BPE learns on the training captions, beyond the 256 bytes
    image_tokens: int  # `<img_xxxxx>` tokens in the vocabulary (official: 64)


@dataclass(frozen=True)
class Preset:
    name: str
    data: DataPreset


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", DataPreset(image_size=64, frames=30, train_stories=160, val_stories=24, test_stories=24,
                                      chunk_length=10, bpe_merges=1024, image_tokens=64)),
    "small": Preset("small", DataPreset(image_size=128, frames=30, train_stories=2000, val_stories=100, test_stories=100,
                                        chunk_length=10, bpe_merges=4096, image_tokens=64)),
    "paper": Preset("paper", DataPreset(image_size=448, frames=30, train_stories=8000, val_stories=180, test_stories=180,
                                        chunk_length=10, bpe_merges=32000, image_tokens=64)),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name is a parameter error that lists the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ParameterError("--preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
