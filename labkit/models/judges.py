"""Judges: small models trained on ground truth that score what the lab generates (docs/paper_to_code.md, "Evaluation").

The paper scores stories with pretrained networks (FID with Inception, CLIP score with CLIP) and GPT-4V. None
can run here, so the lab trains its own judges on StoryStream-mini's ground truth:

- a character classifier (who is the protagonist?) and a style classifier (which art style?);
- an image-text pair, a CNN image encoder + the text tower of `contrastive.py` trained CLIP-style on frames and
  their descriptions or captions. Its image embedding is the FID-analogue feature space; the cosine between an
  image and a text is the CLIP-analogue score.

A judge must not share the blind spots of the model it judges, so judges are small CNNs (not ViTs), with their own
seed and data augmentation, trained separately from the visual tokenizer. Their held-out accuracy is measured and
reported; a judge below 95% would make every downstream number doubtful.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from labkit.core.artifacts import config_hash, load_artifact
from labkit.core.devices import to_module_device
from labkit.core.errors import LabError
from labkit.core.presets import Preset
from labkit.data.frames import CHARACTER_NAMES, STYLE_NAMES, to_float
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.models.contrastive import ImageTextPair, TextTower, TextTowerConfig, embed_images, embed_texts, tokenize

STAGE = "judges"
TEXT_TOKENIZER = "text_tokenizer"  # the BPE tokenizer the text tower was trained with, saved inside the artifact


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int
    channels: tuple[int, ...] = (32, 64, 128, 128)  # a stride-2 conv per entry but the last (stride 1)
    embed_dim: int = 64  # the image-text space (FID-analogue features are the encoder's last channels)
    text: TextTowerConfig = field(default_factory=lambda: TextTowerConfig(max_length=64))
    caption_mix: float = 0.25  # share of rows paired with the story caption instead of the frame description
    shift: int = 4  # augmentation: random translation by up to this many pixels (edges replicated)
    flip: bool = True  # augmentation: random horizontal flips (identity and style do not depend on facing)
    seed: int = 1  # the visual tokenizer uses 0: judges start from other weights and see other batches


class ConvEncoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> [B, C]: strided 3x3 convolutions, GroupNorm, GELU, global average pool."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        layers, previous = [], 3
        for i, width in enumerate(channels):
            stride = 1 if i == len(channels) - 1 else 2
            layers += [nn.Conv2d(previous, width, 3, stride=stride, padding=1), nn.GroupNorm(8, width), nn.GELU()]
            previous = width
        self.net = nn.Sequential(*layers)
        self.out_dim = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).mean(dim=(2, 3))


class Classifier(nn.Module):
    def __init__(self, channels: Sequence[int], classes: int):
        super().__init__()
        self.encoder = ConvEncoder(channels)
        self.head = nn.Linear(self.encoder.out_dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


class ProjectedEncoder(nn.Module):
    """A ConvEncoder followed by a linear map into the image-text space."""

    def __init__(self, channels: Sequence[int], embed_dim: int):
        super().__init__()
        self.encoder = ConvEncoder(channels)
        self.proj = nn.Linear(self.encoder.out_dim, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(images))


class Judges(nn.Module):
    """The three judges in one module (independent weights; trained side by side on the same batches)."""

    def __init__(self, config: JudgeConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.config = config
        self.character = Classifier(config.channels, len(CHARACTER_NAMES))
        self.style = Classifier(config.channels, len(STYLE_NAMES))
        self.image_text = ImageTextPair(
            ProjectedEncoder(config.channels, config.embed_dim), TextTower(vocab_size, config.text, pad_id)
        )
        self.text_tokenizer: StoryTokenizer | None = None  # set when loaded: texts must be tokenized as in training

    def _float(self, images: torch.Tensor) -> torch.Tensor:
        images = to_module_device(self, images)
        return to_float(images) if images.dtype == torch.uint8 else images

    @torch.no_grad()
    def predict_character(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Protagonist index (into CHARACTER_NAMES) of each image (uint8 or [-1, 1] floats)."""
        return torch.cat(
            [self.character(self._float(images[i : i + batch])).argmax(-1).cpu() for i in range(0, len(images), batch)]
        )

    @torch.no_grad()
    def predict_style(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat(
            [self.style(self._float(images[i : i + batch])).argmax(-1).cpu() for i in range(0, len(images), batch)]
        )

    @torch.no_grad()
    def fid_features(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """The FID-analogue feature space: the image-text encoder's pooled channels [B, C] (before projection)."""
        encoder = self.image_text.image_encoder.encoder
        return torch.cat([encoder(self._float(images[i : i + batch])).cpu() for i in range(0, len(images), batch)])

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return embed_images(self.image_text, images)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.text_tokenizer is None:
            raise LabError(
                "these judges have no text tokenizer attached; load them with labkit.training.stage0.load_judges"
            )
        ids, mask = tokenize(texts, self.text_tokenizer, self.config.text.max_length)
        return embed_texts(self.image_text, ids, mask)

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """CLIP-analogue score: cosine between each image and its text, [B] in [-1, 1]."""
        if len(images) != len(texts):
            raise LabError(f"clip_score: {len(images)} images but {len(texts)} texts")
        return (self.embed_images(images) * self.embed_texts(texts)).sum(-1)


def judge_hash(config: JudgeConfig) -> str:
    return config_hash(asdict(config))


def load_judges_artifact(folder: Path | str, preset: Preset, config: JudgeConfig) -> tuple[Judges, dict]:
    """Load a judges artifact (weights + its text tokenizer); refuse other presets or other sizes."""
    folder = Path(folder)
    state, manifest = load_artifact(folder, STAGE, preset.name, judge_hash(config))
    text_tokenizer = StoryTokenizer.from_pretrained(folder / TEXT_TOKENIZER)
    judges = Judges(config, text_tokenizer.vocab_size, text_tokenizer.pad_id)
    judges.load_state_dict(state)
    judges.text_tokenizer = text_tokenizer
    return judges.eval().requires_grad_(False), manifest


def augment(images: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translations (replicated edges) and horizontal flips, drawn from `generator`:
    the same batch every time."""
    batch, _, height, width = images.shape
    offsets = (
        torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator)
        if shift
        else torch.zeros(batch, 2, dtype=torch.long)
    )
    flips = torch.rand(batch, generator=generator) < 0.5 if flip else torch.zeros(batch, dtype=torch.bool)
    padded = F.pad(images, (shift,) * 4, mode="replicate") if shift else images
    out = torch.stack([padded[b, :, dy : dy + height, dx : dx + width] for b, (dy, dx) in enumerate(offsets.tolist())])
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
