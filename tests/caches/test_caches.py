"""KV-cache policies (labkit.caches): correctness against references, bounds, and each policy's selection.

Acceptance: `dense` equals `DynamicCache`; with a 1-layer model a re-rotating policy's logits
equal a fresh forward over the kept tokens at positions 0..n-1 (also after 2,000 steps); memory stays
bounded; batch > 1 without padding; bad parameters are named. Models are tiny (hidden 32, fp32) so the
whole file runs in seconds on two shared CPU cores.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from labkit.caches import POLICIES, forward_with_cache, make_cache, make_policy, scaled_slots
from labkit.core.errors import ParameterError

# ---- a story token layout (`decode_long_story_data`): <s> c0 <img> q.. </img> [INST] c1 <img> q.. </img> ... ---------

BOS, INST, BOI, EOI = 1, 2, 3, 4
FIRST_SLOT = 10  # image slot ids 10..73 (<img_00000>..<img_00063>)
CAPTION_IDS = list(range(74, 100))
VOCAB = 100


def story_ids(segments: int, caption_len: int = 5, q: int = 8, seed: int = 0) -> list[int]:
    """Token ids of `segments` caption+image segments; segment k spans k·L .. k·L+L-1, L = caption_len + q + 3."""
    rng = random.Random(seed)
    ids: list[int] = []
    for k in range(segments):
        ids.append(BOS if k == 0 else INST)
        ids += [rng.choice(CAPTION_IDS) for _ in range(caption_len)]
        ids += [BOI] + [FIRST_SLOT + j % 64 for j in range(q)] + [EOI]
    return ids


def image_params(q: int = 8) -> dict:
    return {"num_image_tokens": q, "boi_id": BOI, "eoi_id": EOI}


def tiny_llama(layers: int = 1, seed: int = 0) -> LlamaForCausalLM:
    # A large init range makes attention peaky, so a wrong position or a missing key changes the logits.
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids fighting over the two shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model1() -> LlamaForCausalLM:
    return tiny_llama(layers=1)


def feed(model, cache, ids: list[int], begin: int = 0, end: int | None = None, chunk: int = 1, on_step=None) -> None:
    """Decode ids[begin:end] through `cache`, `chunk` tokens per forward; on_step(start, kept_before, logits)."""
    end = len(ids) if end is None else end
    for start in range(begin, end, chunk):
        kept_before = cache.kept_positions()
        out = forward_with_cache(model, cache, torch.tensor([ids[start : min(start + chunk, end)]]))
        if on_step is not None:
            on_step(start, kept_before, out.logits)


# ---- dense == DynamicCache ----------------------------------------------------------------------------


def test_dense_equals_dynamic_cache_over_300_steps():
    model = tiny_llama(layers=2)
    ids = torch.randint(5, VOCAB, (1, 312), generator=torch.Generator().manual_seed(1))
    dense, reference = make_cache("dense", model.config), DynamicCache()
    worst = 0.0
    for start, stop in [(0, 12)] + [(t, t + 1) for t in range(12, 312)]:
        a = forward_with_cache(model, dense, ids[:, start:stop]).logits
        b = model(input_ids=ids[:, start:stop], cache=reference).logits
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= 1e-5
    assert dense.kept_positions() == list(range(312)) and dense.get_seq_length() == 312
    assert (
        dense.nbytes() == 2 * 2 * 1 * 2 * 312 * 8 * 4
    )  # layers · (K,V) · batch · kv heads · entries · head_dim · fp32


# ---- re-rotating policies == fresh forward over the kept tokens at 0..n-1 ------------------------------

REROTATING = {
    "window": {"window": 24},
    "sink": {"sink": 4, "window": 20},
    "mm-sink": {"sink": 4, "window": 20, "cap": 46, **image_params(8)},
}
BOUND = {"window": 24, "sink": 24, "mm-sink": 46}


@pytest.mark.slow  # a forward pass per kept-token count
@pytest.mark.parametrize("policy", sorted(REROTATING))
def test_rerotating_policy_equals_fresh_forward_over_kept_tokens(model1, policy):
    ids = story_ids(125)  # 2,000 tokens, 125 images of Q=8: eviction at nearly every step
    assert len(ids) == 2000
    cache = make_cache(policy, model1.config, **REROTATING[policy])
    checked, worst, worst_absolute = 0, 0.0, 0.0

    def check(start, kept_before, logits):
        nonlocal checked, worst, worst_absolute
        n = cache.get_seq_length()
        assert n == len(cache.kept_positions()) <= BOUND[policy]
        assert cache.kept_positions() == sorted(set(cache.kept_positions()))
        if start < 200 or start % 50 == 0 or start == len(ids) - 1:
            q = logits.shape[1]
            tokens = torch.tensor([[ids[p] for p in kept_before] + ids[start : start + q]])
            fresh = model1(input_ids=tokens).logits[:, -q:]  # positions 0..n-1
            worst = max(worst, (logits - fresh).abs().max().item())
            absolute = torch.tensor([kept_before + list(range(start, start + q))])
            wrong = model1(input_ids=tokens, position_ids=absolute).logits[:, -q:]
            worst_absolute = max(worst_absolute, (logits - wrong).abs().max().item())
            checked += 1

    feed(model1, cache, ids, end=16, chunk=16, on_step=check)  # a prefill chunk, then token by token
    feed(model1, cache, ids, begin=16, on_step=check)
    assert checked > 200 and worst <= 1e-4
    if policy != "window":  # a contiguous window is shift-invariant under RoPE; gapped caches are not
        assert worst_absolute > 1e-2, "the reference must be able to tell wrong positions apart"


# ---- what each policy keeps, on a story layout --------------------------------------------------------


def test_window_and_sink_keep_their_definition(model1):
    ids = story_ids(6)
    window = make_cache("window", model1.config, window=10)
    sink = make_cache("sink", model1.config, sink=3, window=10)
    for t in range(len(ids)):
        feed(model1, window, ids, begin=t, end=t + 1)
        feed(model1, sink, ids, begin=t, end=t + 1)
        seen = t + 1
        assert window.kept_positions() == list(range(max(0, seen - 10), seen))
        expected_sink = list(range(seen)) if seen <= 13 else [0, 1, 2] + list(range(seen - 10, seen))
        assert sink.kept_positions() == expected_sink


def test_mm_sink_keeps_image_boundaries_within_cap(model1):
    # Q=8 → 1 head slot and 1 tail slot (7·8/64 and 8·8/64 rounded, at least 1): 11 entries per image.
    # Segment k spans 16k..16k+15, <img> at 16k+6, </img> at 16k+15. Zone of image k:
    # 16k+2..16k+7 (4 text, <img>, 1 slot) and 16k+14..16k+18 (1 slot, </img>, 3 after); 16k+18 is
    # also in image k+1's zone and belongs to the newer image.
    cache = make_cache("mm-sink", model1.config, sink=4, window=12, cap=38, **image_params(8))
    ids = story_ids(5)

    def bounded(start, kept_before, logits):
        assert cache.get_seq_length() <= 38

    feed(model1, cache, ids, on_step=bounded)
    # At t=80 the budget 38 - 4 - 12 = 22 holds images 4 (66, 67 outside the window), 3 and 2 (10 each).
    expected = (
        [0, 1, 2, 3]
        + [*range(34, 40), *range(46, 50)]
        + [*range(50, 56), *range(62, 66)]
        + [66, 67]
        + list(range(68, 80))
    )
    assert cache.kept_positions() == expected
    assert len(expected) == 38


def test_mm_sink_default_zone_is_24_entries_at_q64():
    assert (scaled_slots(7, 64), scaled_slots(8, 64)) == (7, 8)
    assert (scaled_slots(7, 8), scaled_slots(8, 8), scaled_slots(7, 16)) == (1, 1, 2)
    assert make_policy("mm-sink", window=64, cap=200, **image_params(64)).counts == (4, 7, 8, 3)


def test_as_coded_selection_by_hand_q8(model1):
    # Q=8, captions of 5, window of 2 images. Segment k spans 16k..16k+15; <img> 16k+6, </img> 16k+15.
    # First eviction when </img> of image 2 (position 47) arrives; context indices = absolute:
    #   sink = kv[:4] + kv[6-4 : 6+1+1] + kv[15-1 : 15+4] = 0..3, 2..7, 14..18 (15 entries),
    #   cache = sink + kv[15+1+15:] = 31..47; the context now starts at 16.
    first = [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 14, 15, 16, 17, 18]
    # Second eviction at </img> of image 3 (63): image 1 has <img> 22 → context index 6, </img> 31 → 15,
    # applied to cache slots where slots 0..14 are the sink and slot j >= 15 is position 16 + j:
    #   kv[2:8] = sink slots 2..7 (positions 2, 3, 2, 3, 4, 5: copied again, the official quirk);
    #   kv[14:19] = sink slot 14 (position 18), then slots 15..18 = 31..34; window kv[16+26:] = 58..63.
    second = first + [2, 3, 2, 3, 4, 5] + [18, 31, 32, 33, 34]
    ids = story_ids(4)
    for chunk in (1, 16):  # token by token, or one segment per forward: the same selection
        cache = make_cache("mm-sink-as-coded", model1.config, window_images=2, **image_params(8))
        feed(model1, cache, ids, end=48, chunk=chunk)
        assert cache.kept_positions() == first + list(range(31, 48))
        feed(model1, cache, ids, begin=48, end=64, chunk=chunk)
        assert cache.kept_positions() == second + list(range(58, 64))
        assert cache.policy.sink_length == len(second) == 26
        cache.reset()  # a new story on the same cache object selects the same way
        feed(model1, cache, ids, end=64, chunk=chunk)
        assert cache.kept_positions() == second + list(range(58, 64))


def test_as_coded_q64_grows_by_24_and_never_rerotates(model1):
    # Q=64, captions of 10, the official window of 8 images; segments of 77 tokens, <img> at 77k+11.
    ids = story_ids(11, caption_len=10, q=64)
    cache = make_cache("mm-sink-as-coded", model1.config, **image_params(64))
    dense = make_cache("dense", model1.config)
    sinks = []
    for k in range(11):
        feed(model1, cache, ids, begin=77 * k, end=77 * (k + 1), chunk=77)
        feed(model1, dense, ids, begin=77 * k, end=77 * (k + 1), chunk=77)
        sinks.append(cache.policy.sink_length)
        seen = 77 * (k + 1)
        # The sink overwrites the head of the retained context: one entry per context token.
        assert cache.get_seq_length() == seen - cache.policy.context_start
    assert sinks == [0] * 8 + [28, 52, 76]
    kept = cache.kept_positions()
    assert kept[:28] == [0, 1, 2, 3, *range(7, 19), *range(68, 80)]  # BOS+3, kv[boi-4:boi+8], kv[eoi-8:eoi+4]
    assert kept[76:] == list(range(3 * 77 + 76, 11 * 77))  # window: context slots after the 76 sink entries
    # Post-RoPE keys kept as computed: the first sink equals dense's keys at those absolute positions.
    held, reference = cache.layers[0].keys[:, :, :28], dense.layers[0].keys[:, :, kept[:28]]
    assert torch.equal(held, reference)


# ---- batches without padding ----------------------------------------------------------------------------

BATCH_PARAMS = {
    "dense": {},
    "window": {"window": 12},
    "sink": {"sink": 4, "window": 12},
    "mm-sink": {"sink": 4, "window": 12, "cap": 30, **image_params(8)},
    "mm-sink-as-coded": {"window_images": 2, **image_params(8)},
    "mm-sink-stale": {"sink": 4, "window": 12, "cap": 30, **image_params(8)},
    "mm-sink-as-coded-rerotated": {"window_images": 2, **image_params(8)},
}


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_rows_equal_single_rows(model1, policy):
    rows = [story_ids(6, seed=1), story_ids(6, seed=2)]  # same layout, different captions
    assert rows[0] != rows[1]

    def run(batch: list[list[int]]) -> torch.Tensor:
        cache = make_cache(policy, model1.config, **BATCH_PARAMS[policy])
        logits = []
        for start in range(0, len(batch[0]), 3):
            ids = torch.tensor([row[start : start + 3] for row in batch])
            logits.append(forward_with_cache(model1, cache, ids).logits)
        return torch.cat(logits, dim=1)

    together = run(rows)
    for r, row in enumerate(rows):
        # fp32 rounding of batch-1 vs batch-2 matmuls reaches ~1.2e-5 at logits of ~7; mixed rows would differ by ~1
        assert (together[r] - run([row])[0]).abs().max().item() <= 2e-5


def test_batch_rows_must_share_the_image_layout(model1):
    cache = make_cache("mm-sink", model1.config, **BATCH_PARAMS["mm-sink"])
    rows = [story_ids(1), story_ids(1, caption_len=4) + [INST]]
    with pytest.raises(ValueError, match="same positions"):
        cache.observe(torch.tensor(rows))


def test_inputs_embeds_with_the_ids_they_stand_for(model1):
    """Image features enter as `inputs_embeds`; the cache still learns the layout from the ids."""
    ids = torch.tensor([story_ids(3)])
    by_ids = make_cache("mm-sink", model1.config, **BATCH_PARAMS["mm-sink"])
    by_embeds = make_cache("mm-sink", model1.config, **BATCH_PARAMS["mm-sink"])
    for start in range(0, ids.shape[1], 4):
        chunk = ids[:, start : start + 4]
        a = forward_with_cache(model1, by_ids, chunk).logits
        b = forward_with_cache(model1, by_embeds, chunk, inputs_embeds=model1.get_input_embeddings()(chunk)).logits
        assert torch.equal(a, b)
    assert by_embeds.kept_positions() == by_ids.kept_positions() != list(range(ids.shape[1]))


# ---- parameter errors, before any work ------------------------------------------------------------------

GOOD_IMAGES = image_params(8)


@pytest.mark.parametrize(
    "policy, params, name",
    [
        ("streaming", {}, "policy"),
        ("window", {}, "window"),
        ("window", {"window": 0}, "window"),
        ("window", {"widow": 8}, "widow"),
        ("window", {"window": 8.5}, "window"),
        ("sink", {"window": -3}, "window"),
        ("sink", {"sink": 8, "window": 4}, "window"),
        ("sink", {"sink": 0, "window": 4}, "sink"),
        ("mm-sink", {"window": 16, **GOOD_IMAGES}, "cap"),
        ("mm-sink", {"window": 16, "cap": 10, **GOOD_IMAGES}, "cap"),
        ("mm-sink", {"window": 16, "cap": 64, "num_image_tokens": 8, "boi_id": BOI}, "eoi_id"),
        ("mm-sink", {"window": 16, "cap": 64, **GOOD_IMAGES, "head_slots": 9}, "head_slots"),
        ("mm-sink-as-coded", {"boi_id": BOI, "eoi_id": EOI}, "num_image_tokens"),
        ("mm-sink-as-coded", {**GOOD_IMAGES, "window_images": 0}, "window_images"),
        ("mm-sink-as-coded", {"num_image_tokens": 8, "boi_id": BOI, "eoi_id": BOI}, "eoi_id"),
    ],
)
def test_bad_parameters_name_the_parameter(model1, policy, params, name):
    with pytest.raises(ParameterError) as error:
        make_cache(policy, model1.config, **params)
    assert error.value.name == name
    if name == "policy":
        assert all(choice in str(error.value) for choice in POLICIES)


def test_bad_model_config_is_a_parameter_error(model1):
    with pytest.raises(ParameterError) as error:
        make_cache("dense", None)
    assert error.value.name == "model_config"
    config = LlamaConfig(
        **{**model1.config.to_dict(), "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}
    )
    with pytest.raises(ParameterError) as error:
        make_cache("sink", config, window=8)
    assert error.value.name == "model_config"


def test_misuse_is_refused(model1):
    cache = make_cache("mm-sink", model1.config, **BATCH_PARAMS["mm-sink"])
    with pytest.raises(RuntimeError, match="observe"):
        model1(input_ids=torch.tensor([[BOS]]), cache=cache)
    sink = make_cache("sink", model1.config, sink=2, window=4)
    forward_with_cache(model1, sink, torch.tensor([[BOS, 5, 6]]))
    with pytest.raises(ValueError, match="positions 3..3"):
        model1(input_ids=torch.tensor([[7]]), cache=sink, position_ids=torch.tensor([[10]]))
    as_coded = make_cache("mm-sink-as-coded", model1.config, **image_params(8))
    with pytest.raises(ValueError, match="</img> must come"):
        as_coded.observe([BOS, BOI] + [FIRST_SLOT] * 5 + [EOI])  # 5 slots, Q=8


# ---- numerics of re-rotation (repeated fp16 re-rotation drifts) -----------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_rerotation_does_not_drift_over_many_shifts(model1, dtype, tolerance):
    """Keys shifted at every step for 2,000 steps stay a single rotation away from their originals."""
    config = model1.config
    rotary = LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(3)
    originals = torch.randn(1, 2, 2100, 8, generator=generator).to(dtype)  # pre-RoPE keys, one per token

    def model_rotation(keys: torch.Tensor, positions: list[int]) -> torch.Tensor:
        cos, sin = rotary(keys, torch.tensor([positions]))  # the model's own tables, in the key dtype
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    cache = make_cache("sink", config, sink=4, window=16)
    worst = 0.0
    for t in range(2000):
        n = cache.get_seq_length()
        kept = cache.kept_positions()
        new = model_rotation(originals[:, :, t : t + 1], [n])
        keys, _ = cache.update(new, torch.zeros_like(new), 0)
        fresh = model_rotation(originals[:, :, kept + [t]], list(range(n + 1)))
        worst = max(worst, (keys.float() - fresh.float()).abs().max().item())
    assert worst <= tolerance

    # Why we rotate from stored originals: rotating an already rotated fp16 key by one step per shift
    # (what the old HF SinkCache did with the delta) drifts far more over the same 2,000 shifts.
    if dtype == torch.float16:
        key = model_rotation(originals[:, :, :1], [2000])
        cos, sin = rotary(key, torch.tensor([[-1]]))
        for _ in range(2000):
            key = apply_rotary_pos_emb(key, key, cos, sin)[1]
        naive = (key.float() - model_rotation(originals[:, :, :1], [0]).float()).abs().max().item()
        assert naive > 3 * worst


@pytest.mark.parametrize(
    "policy", ["dense", "sink", "mm-sink", "mm-sink-as-coded", "mm-sink-stale", "mm-sink-as-coded-rerotated"]
)
def test_lookahead_leaves_the_cache_as_it_was(policy):
    """A look-ahead forward (the image query slots) sees the held entries, then leaves no trace."""
    from labkit.caches import forward_with_cache, make_cache

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    boi, eoi, q = 60, 61, 4
    story = [1, 5, 6, boi, 10, 11, 12, 13, eoi, 7, 8, boi, 10, 11, 12, 13, eoi, 9, 9]
    params = {
        "dense": {},
        "sink": {"sink": 2, "window": 8},
        "mm-sink": {"sink": 2, "window": 8, "cap": 24, "num_image_tokens": q, "boi_id": boi, "eoi_id": eoi},
        "mm-sink-as-coded": {"num_image_tokens": q, "boi_id": boi, "eoi_id": eoi, "window_images": 1},
    }
    params["mm-sink-stale"] = params["mm-sink"]
    params["mm-sink-as-coded-rerotated"] = params["mm-sink-as-coded"]
    params = params[policy]
    plain, peeked = make_cache(policy, config, **params), make_cache(policy, config, **params)
    with torch.no_grad():
        for token in story[:-1]:
            forward_with_cache(model, plain, torch.tensor([[token]]))
            forward_with_cache(model, peeked, torch.tensor([[token]]))
        with peeked.lookahead():
            forward_with_cache(model, peeked, torch.tensor([[boi, 10, 11]]))
        assert peeked.kept_positions() == plain.kept_positions() and peeked.nbytes() == plain.nbytes()
        a = forward_with_cache(model, plain, torch.tensor([[story[-1]]])).logits
        b = forward_with_cache(model, peeked, torch.tensor([[story[-1]]])).logits
    assert torch.equal(a, b)


def test_rotation_positions_are_slots_when_rerotated_and_frozen_otherwise():
    from labkit.caches import forward_with_cache, make_cache

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    boi, eoi, q = 60, 61, 4
    segment = [5, 6, 7, 8, 9, boi, 10, 11, 12, 13, eoi]
    story = [1] + segment * 4
    shifted = make_cache("sink", config, sink=2, window=10)
    coded = make_cache("mm-sink-as-coded", config, num_image_tokens=q, boi_id=boi, eoi_id=eoi, window_images=2)
    with torch.no_grad():
        for token in story:
            forward_with_cache(model, shifted, torch.tensor([[token]]))
            forward_with_cache(model, coded, torch.tensor([[token]]))
    assert shifted.rotation_positions() == list(range(12))
    rotations, kept = coded.rotation_positions(), coded.kept_positions()
    assert len(rotations) == len(kept)
    # before the first eviction every key was rotated at its story position; afterwards at the cache length then
    assert rotations[:4] == kept[:4] == [0, 1, 2, 3]
    assert rotations != list(range(len(rotations)))  # stale: not the slots a correct cache would give them


# ---- the two controls: selection and key positions, one at a time ---------------------------------------
# mm-sink vs mm-sink-as-coded differ in what they keep (the official slicing) and where kept keys sit (re-rotated vs
# stale). mm-sink-as-coded-rerotated keeps as-coded's entries at re-rotated positions; mm-sink-stale keeps mm-sink's
# entries at stale positions.

CONTROLS = {  # control -> (parent, parameters shared by both)
    "mm-sink-as-coded-rerotated": ("mm-sink-as-coded", {"window_images": 2, **image_params(8)}),
    "mm-sink-stale": ("mm-sink", {"sink": 4, "window": 12, "cap": 30, **image_params(8)}),
}


def rotated_to(cache, rerotating_cache_keys: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Stored pre-RoPE keys of a re-rotating cache, rotated to `positions` (one per held entry)."""
    cos, sin = cache.rotary.table(max(positions) + 1, rerotating_cache_keys.device)
    return cache.rotary.rotate(rerotating_cache_keys, cos[positions], sin[positions])


def fresh_layer0_keys(model, token_ids: list[int]) -> torch.Tensor:
    """Layer-0 keys of a fresh forward over `token_ids` at positions 0..n-1 (they depend on token and position only)."""
    reference = DynamicCache()
    model(input_ids=torch.tensor([token_ids]), cache=reference)
    return reference.layers[0].keys


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_control_keeps_its_parents_entries(model1, control):
    """Entry for entry (duplicates of the official slicing included) the control holds what its parent holds."""
    parent, params = CONTROLS[control]
    ids = story_ids(8)  # 8 segments of 16 tokens: 6 as-coded evictions, mm-sink zones dropped under the cap
    a, b = make_cache(control, model1.config, **params), make_cache(parent, model1.config, **params)
    for chunk in (1, 5):
        for start in range(0, len(ids), chunk):
            feed(model1, a, ids, begin=start, end=min(start + chunk, len(ids)), chunk=chunk)
            feed(model1, b, ids, begin=start, end=min(start + chunk, len(ids)), chunk=chunk)
            assert a.kept_positions() == b.kept_positions()
            assert a.get_seq_length() == b.get_seq_length() == len(a.kept_positions())
        kept = a.kept_positions()
        assert len(kept) < len(ids)  # evictions happened
        if parent == "mm-sink-as-coded":
            assert len(set(kept)) < len(kept)  # the overwrite/duplicate quirk is kept
        a.reset()
        b.reset()


def test_as_coded_rerotated_keys_sit_at_their_slots(model1):
    """mm-sink-as-coded-rerotated: held keys equal a fresh forward's over the kept tokens at slots 0..n-1, and
    its logits equal that fresh forward's (what the re-rotation test checks for mm-sink), while mm-sink-as-coded's
    keys are the same entries at their stale rotations."""
    params = CONTROLS["mm-sink-as-coded-rerotated"][1]
    ids = story_ids(8)
    rerotated = make_cache("mm-sink-as-coded-rerotated", model1.config, **params)
    coded = make_cache("mm-sink-as-coded", model1.config, **params)
    worst, worst_coded, checked = 0.0, 0.0, 0

    def check(start, kept_before, logits):
        nonlocal worst, worst_coded, checked
        tokens = [ids[p] for p in kept_before] + [ids[start]]
        fresh = model1(input_ids=torch.tensor([tokens])).logits[:, -1:]
        worst = max(worst, (logits - fresh).abs().max().item())
        checked += 1

    def check_coded(start, kept_before, logits):
        nonlocal worst_coded
        tokens = [ids[p] for p in kept_before] + [ids[start]]
        fresh = model1(input_ids=torch.tensor([tokens])).logits[:, -1:]
        worst_coded = max(worst_coded, (logits - fresh).abs().max().item())

    feed(model1, rerotated, ids, on_step=check)
    feed(model1, coded, ids, on_step=check_coded)
    assert checked == len(ids) and worst <= 1e-4
    assert worst_coded > 1e-2, "stale positions must show in the logits, or the check proves nothing"

    kept = rerotated.kept_positions()
    assert kept == coded.kept_positions() and len(set(kept)) < len(kept)
    slots = rotated_to(rerotated, rerotated.layers[0].keys, list(range(len(kept))))
    assert (slots - fresh_layer0_keys(model1, [ids[p] for p in kept])).abs().max().item() <= 1e-5
    # The same stored keys rotated to the stale positions as-coded gave them: exactly as-coded's keys.
    stale = rotated_to(rerotated, rerotated.layers[0].keys, coded.rotation_positions())
    assert (stale - coded.layers[0].keys).abs().max().item() <= 1e-5
    assert (slots - coded.layers[0].keys).abs().max().item() > 1e-2


def test_mm_sink_stale_keys_keep_their_original_rotation(model1):
    """mm-sink-stale: held keys are the keys as first computed (rotated at the held-entry count of that step), not
    re-rotated; mm-sink's stored originals rotated to those positions give them back."""
    params = CONTROLS["mm-sink-stale"][1]
    ids = story_ids(8)
    stale = make_cache("mm-sink-stale", model1.config, **params)
    shifted = make_cache("mm-sink", model1.config, **params)
    # Each token's key as the model computed it (rotated at the held-entry count of its step), recorded when stored.
    computed: dict[int, torch.Tensor] = {}

    def record(start, kept_before, logits):
        computed[start] = stale.layers[0].keys[:, :, -1:] if stale.kept_positions()[-1] == start else None

    feed(model1, stale, ids, on_step=record)
    feed(model1, shifted, ids)
    kept, rotations = stale.kept_positions(), stale.rotation_positions()
    assert kept == shifted.kept_positions()
    assert rotations != list(range(len(kept)))  # stale: not the slots
    original = torch.cat([computed[p] for p in kept], dim=-2)
    assert torch.equal(stale.layers[0].keys, original)  # never touched since computed
    back = rotated_to(shifted, shifted.layers[0].keys, rotations)
    assert (back - stale.layers[0].keys).abs().max().item() <= 1e-5
    slots = fresh_layer0_keys(model1, [ids[p] for p in kept])
    assert (slots - stale.layers[0].keys).abs().max().item() > 1e-2


def test_all_four_image_sinks_agree_before_any_eviction():
    """Nothing evicted yet: mm-sink, mm-sink-stale, mm-sink-as-coded, mm-sink-as-coded-rerotated give the same
    logits (2 layers, prefill chunk then token by token)."""
    model = tiny_llama(layers=2)
    ids = story_ids(4)  # 64 tokens, 4 images: below every bound
    zones = {"sink": 4, "window": 64, "cap": 128, **image_params(8)}
    slices = {"window_images": 8, **image_params(8)}
    roomy = {"mm-sink": zones, "mm-sink-stale": zones, "mm-sink-as-coded": slices, "mm-sink-as-coded-rerotated": slices}
    logits = {}
    for policy, params in roomy.items():
        cache = make_cache(policy, model.config, **params)
        steps = []
        feed(model, cache, ids, end=16, chunk=16, on_step=lambda s, k, out: steps.append(out))
        feed(model, cache, ids, begin=16, on_step=lambda s, k, out: steps.append(out))
        assert cache.kept_positions() == list(range(len(ids)))
        logits[policy] = torch.cat(steps, dim=1)
    reference = logits["mm-sink-as-coded"]
    for policy, value in logits.items():
        assert (value - reference).abs().max().item() <= 1e-5, policy
