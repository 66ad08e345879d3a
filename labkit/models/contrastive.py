"""CLIP-style contrastive learning on (image, text) pairs: a small text tower and the symmetric InfoNCE loss.

The paper's visual tokenizer is Qwen-VL's ViT, pretrained on web-scale image-text pairs; that pretraining is what
makes its features say *who* and *where*. Stage 0 of the lab repeats the idea at toy scale: a tiny ViT and this
text tower learn a shared space from StoryStream-mini frames and their descriptions. The judges reuse the same
pieces with a CNN image encoder (their image-text pair gives the CLIP-analogue score).

Templated descriptions repeat ("Mira ... in the forest ... flat style" fits many frames), so a batch often holds
the same text several times. The loss works on the batch's *distinct* texts: each image has one right text, and
each text has every image that shares it as a positive (uniform soft targets), never a false negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from labkit.core.devices import to_module_device
from labkit.data.descriptions import describe_split
from labkit.data.frames import load_frames, to_float
from labkit.data.text_tokenizer import StoryTokenizer


@dataclass(frozen=True)
class TextTowerConfig:
    """Sizes of the text tower (its vocabulary comes from the data set's BPE tokenizer)."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 48  # descriptions are about 30 BPE tokens, captions fewer
    embed_dim: int = 64  # the shared image-text space


class TextTower(nn.Module):
    """Token ids [B, L] (+ mask) -> one embedding per text [B, embed_dim]: a pre-norm transformer, mean-pooled."""

    def __init__(self, vocab_size: int, config: TextTowerConfig, pad_id: int = 0):
        super().__init__()
        self.config, self.pad_id = config, pad_id
        self.token_embedding = nn.Embedding(vocab_size, config.width)
        self.positions = nn.Parameter(0.01 * torch.randn(config.max_length, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            4 * config.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, config.embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positions[: ids.shape[1]]
        x = self.blocks(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)  # mean over real tokens: no EOS token needed
        return self.proj(self.ln_final(pooled))


def tokenize(texts: Sequence[str], tokenizer: StoryTokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids [T, L], mask [T, L]) padded with the tokenizer's <pad>, cut at `max_length` tokens."""
    encoded = [e.ids[:max_length] for e in tokenizer.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    length = max(1, max((len(e) for e in encoded), default=1))
    ids = torch.full((len(encoded), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[row, : len(e)] = True
    return ids, mask


class ImageTextPair(nn.Module):
    """An image encoder and a text tower trained into one space, with CLIP's learnable temperature.

    `image_encoder` maps images to [B, E] or to a set of features [B, N, E] (averaged over N: the visual
    tokenizer's N x D features are contrasted through their mean, so every query stays free to specialise).
    """

    def __init__(self, image_encoder: nn.Module, text: TextTower, temperature: float = 0.07):
        super().__init__()
        self.image_encoder, self.text = image_encoder, text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.image_encoder(images)
        return F.normalize(out.mean(1) if out.ndim == 3 else out, dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, mask), dim=-1)

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, text_index: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """Loss for images [B] whose right text is row `text_index[b]` of the distinct texts (ids, mask) [T]."""
        image, text = self.encode_image(images), self.encode_text(ids, mask)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP caps the inverse temperature at 100
        loss = clip_loss(scale * image @ text.T, text_index)
        return loss, {"temperature": float(1 / scale.detach())}


def clip_loss(logits: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on logits [B images, T distinct texts]; image b's text is `text_index[b]`.

    Image -> text: cross-entropy to the one right text. Text -> image: cross-entropy to a uniform distribution
    over all images that share the text (a text used by k images has k positives).
    """
    image_to_text = F.cross_entropy(logits, text_index)
    positives = F.one_hot(text_index, logits.shape[1]).T.to(logits.dtype)  # [T, B]
    targets = positives / positives.sum(1, keepdim=True).clamp(min=1)
    used = positives.sum(1) > 0  # every text in the batch has an image, but be safe
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(1)[used].mean()
    return (image_to_text + text_to_image) / 2


def distinct(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct values of `indices`, each entry's row among them): how a batch turns text ids into `text_index`."""
    values, inverse = torch.unique(indices, return_inverse=True)
    return values, inverse


@torch.no_grad()
def retrieval(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_index: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image -> text retrieval over a set of candidate texts: top-k accuracy, and what chance would score."""
    similarity = image_embeddings @ text_embeddings.T
    rank = (similarity > similarity.gather(1, text_index[:, None])).sum(1)  # texts scored above the right one
    out = {f"top{k}": float((rank < k).float().mean()) for k in ks}
    out["chance_top1"] = 1.0 / text_embeddings.shape[0]
    return out


@torch.no_grad()
def embed_texts(pair: ImageTextPair, ids: torch.Tensor, mask: torch.Tensor, batch: int = 512) -> torch.Tensor:
    ids, mask = to_module_device(pair, ids), to_module_device(pair, mask)
    return torch.cat(
        [pair.encode_text(ids[i : i + batch], mask[i : i + batch]).cpu() for i in range(0, len(ids), batch)]
    )


@torch.no_grad()
def embed_images(pair: ImageTextPair, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Normalised image embeddings; `images` may be uint8 (converted batch by batch to [-1, 1])."""
    out = []
    for i in range(0, len(images), batch):
        chunk = to_module_device(pair, images[i : i + batch])
        out.append(pair.encode_image(to_float(chunk) if chunk.dtype == torch.uint8 else chunk).cpu())
    return torch.cat(out)


@dataclass
class PairData:
    """Every frame of a split with the rows of its texts: for contrastive batches, retrieval and probes."""

    images: torch.Tensor  # uint8 [M, 3, H, W], frames of all stories in order (M = stories x frames)
    description: torch.Tensor  # long [M]: row of the frame's description in `texts`
    caption: torch.Tensor  # long [M]: row of the frame's story caption in `texts`
    texts: list[str]  # the distinct texts
    ids: torch.Tensor  # long [T, L]: `texts` tokenized
    mask: torch.Tensor  # bool [T, L]
    labels: dict[str, torch.Tensor]  # protagonist, style, scene: long [M]
    shape: tuple[int, int]  # (stories, frames)

    def batch(self, index: torch.Tensor, use_caption: torch.Tensor | None = None) -> dict:
        """Frames `index` with their texts: the batch's distinct texts and each frame's row among them."""
        text = (
            self.description[index]
            if use_caption is None
            else torch.where(use_caption, self.caption[index], self.description[index])
        )
        rows, text_index = distinct(text)
        mask = self.mask[rows]
        length = int(mask.sum(1).max())  # drop padding columns no text in this batch needs
        return {
            "images": self.images[index],
            "ids": self.ids[rows, :length],
            "mask": mask[:, :length],
            "text_index": text_index,
        }

    def description_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask) of the split's distinct descriptions and each frame's row among them (retrieval candidates)."""
        rows, index = distinct(self.description)
        return self.ids[rows], self.mask[rows], index


def load_pairs(root, split: str, tokenizer: StoryTokenizer, max_length: int) -> PairData:
    """Frames, descriptions, captions and labels of one split of a data set folder."""
    frames = load_frames(root, split)
    descriptions = describe_split(root, split)
    texts: dict[str, int] = {}
    description = [texts.setdefault(d, len(texts)) for story in descriptions for d in story]
    caption = [texts.setdefault(c, len(texts)) for story in frames.captions for c in story]
    ids, mask = tokenize(list(texts), tokenizer, max_length)
    stories, count = frames.images.shape[:2]
    return PairData(
        frames.images.flatten(0, 1),
        torch.tensor(description),
        torch.tensor(caption),
        list(texts),
        ids,
        mask,
        {name: getattr(frames, name).flatten() for name in ("protagonist", "style", "scene")},
        (stories, count),
    )


@torch.no_grad()
def rank_texts(
    pair: ImageTextPair, images: torch.Tensor, texts: Sequence[str], tokenizer: StoryTokenizer, k: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the `k` best-matching of `texts`: (indices [B, k], cosine scores [B, k])."""
    ids, mask = tokenize(texts, tokenizer, pair.text.config.max_length)
    similarity = embed_images(pair, images) @ embed_texts(pair, ids, mask).T
    scores, indices = similarity.topk(min(k, len(texts)), dim=1)
    return indices, scores
