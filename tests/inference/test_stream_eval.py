"""`labkit stream-eval` end to end on a tiny random Llama saved to a local folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.cli.main import main


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_stream_eval_cli_writes_curves(model_folder, tmp_path, capsys):
    out = tmp_path / "curves.json"
    assert (
        main(
            [
                "stream-eval",
                "--model",
                str(model_folder),
                "--tokens",
                "120",
                "--window",
                "40",
                "--sink",
                "4",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result["curves"]) == {"dense", "window", "sink"}
    for policy, curve in result["curves"].items():
        assert len(curve["nll"]) == len(curve["kv_bytes"]) == len(curve["seconds"]) == 119
    dense, window, sink = (result["curves"][p]["kv_bytes"] for p in ("dense", "window", "sink"))
    assert dense[-1] > sink[-1] >= window[-1] and window[-1] == window[60]  # bounded caches stop growing
    # before anything is evicted, every policy sees the same context and scores the same
    assert result["curves"]["window"]["nll"][:39] == pytest.approx(result["curves"]["dense"]["nll"][:39], abs=1e-4)
    assert "final running perplexity" in capsys.readouterr().out


def test_stream_eval_refuses_a_missing_model_and_unknown_policies(tmp_path, model_folder, capsys):
    assert main(["stream-eval", "--model", str(tmp_path / "none"), "--json", str(tmp_path / "x.json")]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    assert (
        main(
            [
                "stream-eval",
                "--model",
                str(model_folder),
                "--policies",
                "dense,mm-sink",
                "--tokens",
                "10",
                "--json",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    assert "--policies" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
