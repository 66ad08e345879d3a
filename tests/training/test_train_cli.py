"""`labkit train`, `labkit info` and artifact loading: clear refusals for user mistakes (exit code 2)."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.cli.main import main
from labkit.core.artifacts import save_artifact
from labkit.core.errors import LabError
from labkit.core.presets import get_preset
from labkit.training.stage2 import load_mllm, mllm_config_hash

pytestmark = pytest.mark.slow  # trains or launches processes: `make test` runs it, `make test-fast` does not

TINY = get_preset("tiny")


@pytest.mark.parametrize(
    "args, parameter",
    [
        (["train", "stage2", "--preset", "huge"], "--preset"),
        (["train", "stage2", "--schedule", "forever"], "--schedule"),
        (["train", "stage2", "--steps", "0"], "--steps"),
        (["train", "stage2", "--sampler", "every-other"], "--sampler"),
        (["info", "--preset", "huge"], "--preset"),
    ],
)
def test_bad_training_parameters(capsys, args, parameter):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert parameter in err and "Traceback" not in err


def test_paper_preset_lists_every_missing_weight_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABKIT_WEIGHTS", str(tmp_path))
    assert main(["train", "stage2", "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert (
        str(tmp_path / "Llama-2-7b-hf/config.json") in err and str(tmp_path / "visual_tokenizer/qwen_vit_G.pt") in err
    )


def _fake_mllm_artifact(folder, preset="tiny", config_hash=None, stage="stage2"):
    from labkit.core.paths import project_root
    from labkit.data.storystream_mini import load_tokenizer

    tokenizer = load_tokenizer(project_root() / "data_samples" / "storystream-mini")
    manifest = {
        "stage": stage,
        "preset": preset,
        "config_hash": config_hash or mllm_config_hash(get_preset("tiny"), tokenizer.vocab_size),
    }
    save_artifact(folder, {"x": torch.zeros(1)}, manifest, extra=lambda f: tokenizer.save_pretrained(f / "tokenizer"))


def test_a_checkpoint_from_another_preset_or_config_is_refused(tmp_path):
    _fake_mllm_artifact(tmp_path / "small", preset="small")
    with pytest.raises(LabError, match="trained for preset 'small', not 'tiny'.*labkit train stage2 --preset tiny"):
        load_mllm(tmp_path / "small", TINY)
    _fake_mllm_artifact(tmp_path / "old", config_hash="0123456789abcdef")
    with pytest.raises(
        LabError, match="does not match the current code's tiny preset.*Rebuild it: labkit train stage2"
    ):
        load_mllm(tmp_path / "old", TINY)
    _fake_mllm_artifact(tmp_path / "vt", stage="stage0")
    with pytest.raises(LabError, match="expected 'stage2'"):
        load_mllm(tmp_path / "vt", TINY)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"stage": "stage2",\n  oops}')
    with pytest.raises(LabError, match="manifest.json:2: malformed manifest"):
        load_mllm(tmp_path / "broken", TINY)


def test_info_reports_paper_counts_as_json(capsys):
    assert main(["info", "--preset", "paper", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    counts = info["parameters"]
    assert info["vocab_size"] == 32066 and info["lora"]["r"] == 16 and info["lora"]["alpha"] == 32
    assert abs(counts["llm_body"]["total"] - 6.74e9) / 6.74e9 < 0.005 and counts["lora"]["trainable"] == 39_976_960
    assert counts["visual_tokenizer"]["total"] > 1.8e9
