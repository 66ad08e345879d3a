"""The sink-emergence study's data and measurement (labkit.experiments.sink_emergence)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.core.paths import project_root
from labkit.data.storystream_mini import load_tokenizer
from labkit.experiments.sink_emergence import EmergenceConfig, StreamData, bos_ratios

pytestmark = pytest.mark.slow  # trains or launches processes: `make test` runs it, `make test-fast` does not

SAMPLE = project_root() / "data_samples" / "storystream-mini"


def test_backcopy_copies_the_token_before_each_trigger():
    tokenizer = load_tokenizer(SAMPLE)
    data = StreamData("backcopy", tokenizer, [["Mira walks."]], EmergenceConfig(length=128))
    ids = data.sequence(random.Random(0))
    assert ids[0] == tokenizer.bos_id and len(ids) == 128
    triggers = [i for i, t in enumerate(ids[:-1]) if t in data.triggers]
    assert triggers and all(ids[i + 1] == ids[i - 1] for i in triggers)


def test_bos_ratios_per_layer_mean_and_strongest_head():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
        )
    ).eval()
    mean, strongest = bos_ratios(model, torch.randint(0, 50, (2, 40)))
    assert len(mean) == len(strongest) == 2
    assert all(s >= m > 0 for m, s in zip(mean, strongest))


def test_sink_study_cli_refuses_bad_levers_and_merges_a_partial_rerun(tmp_path, capsys):
    import json

    from labkit.cli.main import main

    for args in (["--settings", "nosuch"], ["--lr", "0"], ["--batch-size", "0"], ["--steps", "0"]):
        assert main(["sink-study", "--out", str(tmp_path / "x.json"), "--quiet", *args]) == 2
        assert "parameter" in capsys.readouterr().err
    out = tmp_path / "study.json"
    out.write_text(json.dumps({"settings": {"story": {"kept": True}}}))
    assert (
        main(
            [
                "sink-study",
                "--steps",
                "2",
                "--settings",
                "backcopy",
                "--data",
                str(SAMPLE),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    settings = json.loads(out.read_text())["settings"]
    assert settings["story"] == {"kept": True} and settings["backcopy"]["config"]["steps"] == 2


def test_the_committed_study_is_what_reference_study_runs():
    import json
    from dataclasses import asdict

    from labkit.experiments.sink_emergence import REFERENCE_RUNS

    committed = json.loads((project_root() / "checkpoints" / "tiny" / "sink_emergence.json").read_text())["settings"]
    expected = {
        setting + suffix: asdict(EmergenceConfig(**fields))
        for suffix, settings, fields in REFERENCE_RUNS
        for setting in settings
    }
    assert {name: result["config"] for name, result in committed.items()} == expected
    grown = committed["backcopy, lr 3e-3, wd 0.1"]
    assert grown["max_bos_ratio"] >= 5 and grown["window_vs_sink_nll"]["window"] > grown["window_vs_sink_nll"]["sink"]
