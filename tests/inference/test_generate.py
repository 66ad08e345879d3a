"""The long-story generation loop and `labkit trace-cache` on a random tiny model (layout known in advance)."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.cli.main import main
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.data.storystream_mini import load_tokenizer
from labkit.experiments.cache_trace import OPENING, trace_cache
from labkit.inference.generate import generate_story
from labkit.models.mllm import SeedStoryMLLM

SEGMENTS, CAPTION, Q = 5, 4, 16


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokenizer = load_tokenizer(project_root() / "data_samples" / "storystream-mini")
    model = SeedStoryMLLM(get_preset("tiny"), tokenizer.vocab_size).eval()
    return model, tokenizer, torch.randn(16, 64)


def story(setup, policy, params=None, **kwargs):
    model, tokenizer, first = setup
    return generate_story(
        model,
        tokenizer,
        OPENING,
        first,
        SEGMENTS,
        policy,
        params or {},
        max_caption_tokens=CAPTION,
        fixed_caption_tokens=True,
        **kwargs,
    )


@pytest.mark.slow
def test_layout_of_a_generated_story(setup):
    run = story(setup, "dense")
    opening = len(setup[1].encode(OPENING))
    segment = ["text"] * (1 + CAPTION) + ["boi"] + ["image"] * Q + ["eoi"]  # [INST] caption <img> slots </img>
    assert run.token_types == ["bos"] + ["text"] * opening + ["boi"] + ["image"] * Q + ["eoi"] + segment * (
        SEGMENTS - 1
    )
    assert len(run.captions) == len(run.features) == SEGMENTS and all(f.shape == (16, 64) for f in run.features)
    assert [s.kv_entries for s in run.steps] == [opening + 3 + Q + i * len(segment) for i in range(SEGMENTS)]
    assert run.steps[-1].kept_positions == list(range(len(run.token_ids)))


@pytest.mark.slow
def test_strategies_that_see_everything_agree_with_dense(setup):
    """With room for the whole story, window, sink and recompute-window must write exactly what dense writes."""
    dense = story(setup, "dense")
    for policy, params, extra in (
        ("window", {"window": 4096}, {}),
        ("sink", {"sink": 4, "window": 4096}, {}),
        ("recompute-window", {}, {"recompute_segments": SEGMENTS}),
    ):
        other = story(setup, policy, params, **extra)
        assert other.token_ids == dense.token_ids, policy
        for a, b in zip(dense.features, other.features):
            assert torch.allclose(a, b, atol=1e-4), policy


@pytest.mark.slow
def test_evicting_policies_stay_within_their_bounds(setup):
    for policy, params, bound in (
        ("window", {"window": 40}, 40),
        ("sink", {"sink": 4, "window": 40}, 44),
        ("mm-sink", {"sink": 4, "window": 40, "cap": 60}, 60),
    ):
        run = story(setup, policy, params)
        assert max(s.kv_entries for s in run.steps) <= bound, policy
        assert all(len(s.kept_positions) == s.kv_entries for s in run.steps)
        if policy != "window":
            assert run.steps[-1].kept_positions[:4] == [0, 1, 2, 3]  # the sink: BOS and the first tokens
    recompute = story(setup, "recompute-window", recompute_segments=2)
    last = recompute.steps[-1].kept_positions
    assert last[0] == 0 and len(last) == recompute.steps[-1].kv_entries  # <s> re-added, then the last segments


@pytest.mark.slow
def test_trace_cache_cli_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert (
        main(
            [
                "trace-cache",
                "--policy",
                "sink",
                "--segments",
                "3",
                "--random",
                "--json",
                str(out),
                "--window",
                "30",
                "--sink",
                "2",
                "--caption-tokens",
                "3",
            ]
        )
        == 0
    )
    trace = json.loads(out.read_text())
    assert set(trace) >= {"policy", "params", "token_ids", "token_types", "steps"}
    assert trace["policy"] == "sink" and trace["params"] == {"sink": 2, "window": 30}
    assert len(trace["token_ids"]) == len(trace["token_types"])
    assert [s["segment"] for s in trace["steps"]] == [0, 1, 2]
    assert all(set(s) >= {"segment", "kept_positions", "kv_bytes", "seconds"} for s in trace["steps"])
    assert trace["steps"][-1]["kept_positions"][:2] == [0, 1] and len(trace["steps"][-1]["kept_positions"]) <= 32


@pytest.mark.parametrize(
    "args, parameter",
    [
        (["--policy", "sink", "--random", "--window", "2", "--sink", "4"], "window"),
        (["--policy", "nope", "--random"], "--policy"),
        (["--policy", "dense"], "--model/--random"),
        (["--policy", "dense", "--random", "--segments", "0"], "--segments"),
    ],
)
def test_trace_cache_bad_parameters(tmp_path, capsys, args, parameter):
    assert main(["trace-cache", "--json", str(tmp_path / "t.json"), *args]) == 2
    err = capsys.readouterr().err
    assert parameter in err and "Traceback" not in err and not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_trace_function_matches_generation(setup):
    trace = trace_cache("window", 2, params={"window": 50}, caption_tokens=2)
    assert trace["steps"][-1]["kv_entries"] == len(trace["steps"][-1]["kept_positions"]) <= 50


@pytest.mark.slow
def test_long_context_scores_agree_across_policies_that_see_everything(setup):
    from labkit.inference.long_context import score_story

    model, tokenizer, _ = setup
    captions = [
        "Once upon a time, Mira lived in the forest.",
        "She found a key.",
        "She walked to the beach.",
        "She rested.",
    ]
    features = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(3))
    dense = score_story(model, tokenizer, captions, features, "dense")
    assert len(dense.nll) == 4 and torch.isnan(torch.tensor(dense.nll[0])) and all(v > 0 for v in dense.nll[1:])
    assert all(0 < e < 2 for e in dense.cosine_error[1:])
    for policy, params in (("sink", {"sink": 4, "window": 4096}), ("recompute-window", {})):
        other = score_story(model, tokenizer, captions, features, policy, params, recompute_segments=8)
        assert torch.allclose(torch.tensor(other.nll[1:]), torch.tensor(dense.nll[1:]), atol=1e-4), policy
        assert torch.allclose(torch.tensor(other.cosine_error[1:]), torch.tensor(dense.cosine_error[1:]), atol=1e-4), (
            policy
        )
    small = score_story(model, tokenizer, captions, features, "window", {"window": 24})
    assert max(small.kv_entries) <= 24 and small.nll[1:] != dense.nll[1:]
