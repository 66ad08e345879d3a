"""The official random-length sampler, the all-segments variant, the token layout and the BPE tokenizer."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from labkit.core.errors import ParameterError
from labkit.data.layout import IGNORE_INDEX, build_layout
from labkit.data.sampler import all_segments_sample, make_sample, random_length_sample
from labkit.data.text_tokenizer import StoryTokenizer, image_token

CAPTIONS = [f"Mira walks to place {i}, and she smiles." for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    return StoryTokenizer.train(CAPTIONS + ["Bo finds a key. He laughs!"], merges=60, num_image_tokens=4)


def test_random_length_sampler_draws_k_uniformly_from_0_to_L_minus_2():
    rng = random.Random(0)
    draws = 9000
    ks = Counter(random_length_sample(CAPTIONS, list(range(10)), rng).context_segments for _ in range(draws))
    assert sorted(ks) == list(range(9))  # k in 0..8 for a 10-frame chunk, as the official randint(0, L-2)
    for k, count in ks.items():
        assert abs(count - draws / 9) < 0.15 * draws / 9, (k, count)


def test_random_length_sample_holds_k_plus_2_segments_and_trains_only_the_last():
    rng = random.Random(3)
    for _ in range(50):
        sample = random_length_sample(CAPTIONS, list(range(10)), rng)
        k = sample.context_segments
        assert len(sample.captions) == len(sample.images) == k + 2
        assert sample.text_loss == sample.image_loss == (k + 1,)
        assert sample.images == tuple(range(k + 2))


def test_all_segments_trains_every_caption_after_the_first_and_the_last_image():
    sample = all_segments_sample(CAPTIONS, list(range(10)))
    assert sample.text_loss == tuple(range(1, 10)) and sample.image_loss == (9,)
    with pytest.raises(ParameterError, match="sampler"):
        make_sample("every-other", CAPTIONS, list(range(10)), random.Random(0))
    with pytest.raises(ParameterError, match="2 segments"):
        all_segments_sample(CAPTIONS[:1], [0])


def test_layout_matches_a_hand_written_example(tokenizer):
    t = tokenizer
    c0, c1 = "Bo finds a key.", "He laughs!"
    layout = build_layout([c0, c1], t, num_queries=2, text_loss=(1,), image_loss=(1,))
    q0, q1 = t.image_token_ids[:2]
    e0, e1 = t.encode(c0), t.encode(c1)
    expected = [t.bos_id, *e0, t.boi_id, q0, q1, t.eoi_id, t.inst_id, *e1, t.boi_id, q0, q1, t.eoi_id, t.eos_id]
    assert layout.input_ids == expected
    n0 = 1 + len(e0) + 4  # <s> c0 <img> q q </img>
    # loss: the target's [INST], caption and <img>, then </s>; never its image tokens or </img>
    trained = [i for i, on in enumerate(layout.text_target) if on]
    assert trained == list(range(n0, n0 + 1 + len(e1) + 1)) + [len(expected) - 1]
    assert all(layout.labels[i] == expected[i] for i in trained)
    assert all(layout.labels[i] == IGNORE_INDEX for i in range(len(expected)) if i not in trained)
    assert [i for i, on in enumerate(layout.image_input) if on] == [n0 - 3, n0 - 2]
    assert [i for i, on in enumerate(layout.image_output) if on] == [len(expected) - 4, len(expected) - 3]
    assert layout.token_types[:2] == ["bos", "text"] and layout.token_types[-4:] == ["image", "image", "eoi", "eos"]
    assert layout.image_index[n0 - 3] == 0 and layout.image_index[len(expected) - 4] == 1


def test_layout_of_a_sampled_story_puts_loss_only_on_the_target(tokenizer):
    sample = random_length_sample(CAPTIONS, list(range(10)), random.Random(11))
    layout = build_layout(sample.captions, tokenizer, 4, sample.text_loss, sample.image_loss)
    target = sample.text_loss[0]
    assert {layout.segment[i] for i, on in enumerate(layout.text_target) if on} == {target}
    assert sum(layout.image_output) == 4 and sum(layout.image_input) == 4 * target


def test_layout_rejects_bad_parameters(tokenizer):
    with pytest.raises(ParameterError, match="num_queries"):
        build_layout(CAPTIONS[:2], tokenizer, 5, (1,), (1,))
    with pytest.raises(ParameterError, match="never a text target"):
        build_layout(CAPTIONS[:2], tokenizer, 2, (0,), (1,))


def test_tokenizer_round_trip_keeps_special_tokens_whole(tokenizer, tmp_path):
    text = f"<s>Mira walks.<img>{image_token(0)}{image_token(3)}</img>[INST] Bo finds a key, caf\u00e9!</s>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.tokens(text)
    for special in ("<s>", "<img>", image_token(0), image_token(3), "</img>", "[INST]", "</s>"):
        assert special in tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Mira walks. Bo finds a key, caf\u00e9!"
    tokenizer.save_pretrained(tmp_path / "tok")
    again = StoryTokenizer.from_pretrained(tmp_path / "tok")
    assert again.encode(text) == ids and again.image_token_ids == tokenizer.image_token_ids
    assert again.vocab_size == tokenizer.vocab_size


def test_tokenizer_learns_merges_from_captions(tokenizer):
    # BPE should have merged frequent words: "walks" is far fewer tokens than its bytes
    assert len(tokenizer.encode(" walks")) < len(" walks")
