"""The long-story ablation and the report: grid files, cells, tables, findings, resumable runs, failures."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.cli.main import main
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.experiments.story_ablation import (
    CellConfig,
    finite,
    generate_stories,
    load_inputs,
    run_cell,
    strip_segments,
)
from labkit.report.findings import findings
from labkit.report.grid import load_grid, undeclared_parameters
from labkit.report.paper_tables import table2, table4
from labkit.report.run import run_report

TINY = get_preset("tiny")

SAMPLE = project_root() / "data_samples" / "storystream-mini"
CELL, POLICIES = (
    "07_long_story_ablation-policy={}",
    ["dense", "window", "sink", "mm-sink"],
)  # as tests/report/conftest.py


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- grid files -------------------------------------------------------------------------------------------


def test_grid_expands_the_product_of_axes_in_order(tmp_path):
    grid = write(
        tmp_path / "g.yaml",
        "blocks:\n  - notebook: 07_long_story_ablation.ipynb\n"
        "    axes: {policy: [dense, mm-sink], adaptation: ['off', full]}\n    parameters: {stories: 2}\n",
    )
    runs = load_grid(grid)
    assert [r.axes for r in runs] == [
        {"policy": "dense", "adaptation": "off"},
        {"policy": "dense", "adaptation": "full"},
        {"policy": "mm-sink", "adaptation": "off"},
        {"policy": "mm-sink", "adaptation": "full"},
    ]
    assert all(r.parameters["stories"] == 2 for r in runs)
    assert runs[0].run_id == "07_long_story_ablation-policy=dense-adaptation=off"
    assert len({r.digest() for r in runs}) == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs: []\n", "exactly one top-level key, `blocks`"),
        ("blocks:\n  - notebook: a.ipynb\n    axis: {policy: [dense]}\n", "unknown key(s) ['axis']"),
        ("blocks:\n  - notebook: a.ipynb\n    axes: {policy: []}\n", "non-empty list"),
        (
            "blocks:\n  - notebook: a.ipynb\n    axes: {seed: [0]}\n    parameters: {seed: 1}\n",
            "both as axes and as fixed",
        ),
        ("blocks:\n  - notebook: a.ipynb\n  - notebook: a.ipynb\n", "two runs would both be"),
        ("blocks: [\n", "line 2"),
    ],
)
def test_bad_grid_files_are_refused_naming_the_file(tmp_path, text, message):
    grid = write(tmp_path / "bad.yaml", text)
    with pytest.raises(LabError) as error:
        load_grid(grid)
    assert str(grid) in str(error.value) and message in str(error.value)


def test_the_committed_grids_load_and_name_only_declared_parameters():
    notebook = project_root() / "notebooks" / "07_long_story_ablation.ipynb"
    for name in ("tiny.yaml", "tiny-full.yaml", "small.yaml"):
        runs = load_grid(project_root() / "grids" / name)
        assert runs and all(
            undeclared_parameters(notebook, {**r.parameters, "out_dir": "x", "data_dir": "y"}) == [] for r in runs
        )
    assert undeclared_parameters(notebook, {"polcy": "dense"}) == ["polcy"]


def test_cell_parameters_are_checked_before_work():
    with pytest.raises(ParameterError, match="unknown policy 'nosuch'"):
        CellConfig(policy="nosuch").check()
    with pytest.raises(ParameterError, match='write "off" in quotes'):
        CellConfig(adaptation=False).check()
    with pytest.raises(ParameterError, match="segments"):
        CellConfig(segments=1).check()
    with pytest.raises(ParameterError, match="stories"):
        CellConfig(stories=0).check()
    assert strip_segments(4) == [1, 4] and strip_segments(25) == [1, 10, 25] and strip_segments(100) == [1, 10, 25, 100]


# ---- cells ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    return load_inputs(TINY, SAMPLE, progress=False)


@pytest.mark.slow
def test_generation_is_deterministic_and_cells_repeat_their_metrics_exactly(inputs, tmp_path):
    config = CellConfig(policy="mm-sink", segments=3, stories=1, sample_steps=2)
    first, second = (generate_stories(config, inputs, cache_dir=None, progress=False) for _ in range(2))
    assert first[0].captions == second[0].captions and all(
        torch.equal(a, b) for a, b in zip(first[0].features, second[0].features)
    )
    a = run_cell(config, tmp_path / "a", inputs, progress=False)
    b = run_cell(config, tmp_path / "b", inputs, progress=False)
    assert a["metrics"] == b["metrics"] and a["metrics"]["overall"]["char_acc"] is not None
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["parameters"]["policy"] == "mm-sink" and (tmp_path / "a" / "strip.png").is_file()
    assert len(written["metrics"]["per_segment"]["char_acc"]) == 3 and len(written["timings"]["kv_bytes"]) == 3
    assert written["metrics"]["teacher_forced"]["nll"][0] is None  # segment 1 is not scored: NaN written as null


def test_finite_replaces_nan_for_strict_json():
    assert finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


# ---- tables and findings (rules applied to given numbers) -------------------------------------------------


def record(policy, adaptation="full", fid=1.0, clip=0.5, kv=100, seconds=0.1, perplexity=2.0, segments=25):
    overall = {"fid": fid, "clip": clip, "char_acc": 0.5, "style_consistency": 0.9, "lpips": 0.2}
    return {
        "parameters": {"policy": policy, "adaptation": adaptation, "segments": segments, "seed": 0},
        "metrics": {"overall": overall, "teacher_forced": {"perplexity": perplexity, "feature_cosine_error": 0.1}},
        "timings": {"seconds_per_segment": seconds, "kv_bytes_last_segment": kv},
    }


def test_findings_follow_the_numbers():
    paper_like = [
        record("dense", fid=2.0, clip=0.6, kv=400, seconds=0.2),
        record("window", fid=5.0, clip=0.3),
        record("sink", fid=3.0, clip=0.5),
        record("mm-sink", fid=1.0, clip=0.7, kv=100, seconds=0.1),
        record("recompute-window", seconds=2.0),
        record("mm-sink-as-coded", perplexity=9.0),
    ]
    # records without per-story units: nothing but the deterministic memory finding can get a verdict
    result = findings(table2(paper_like), table4(paper_like), paper_like)
    memory = next(f for f in result if f["claim"].startswith("Dense attention needs the most memory"))
    assert memory["verdict"] == "reproduced" and memory["n"] == 1
    others = [f for f in result if f is not memory]
    assert others and all(f["verdict"] == "inconclusive" and f["ci95"] == [None, None] for f in others)
    assert all("reproduced" not in f and "why_not" not in f for f in result)
    best = next(
        f for f in result if f["claim"].startswith("The multimodal attention sink gives better stories than window")
    )
    assert "no per-story evidence" in best["why"] and best["n"] == 1


def test_table2_uses_the_adapted_detokenizer_and_table4_compares_modes():
    records = [
        record("mm-sink", "full", fid=1.0),
        record("mm-sink", "off", fid=3.0),
        record("mm-sink", "official", fid=2.0),
    ]
    t2, t4 = table2(records), table4(records)
    assert (
        t2["adaptation"] == "full"
        and t2["rows"]["mm-sink"]["fid"] == 1.0
        and t2["rows"]["mm-sink"]["paper"]["fid"] == 79.67
    )
    assert {k: v["fid"] for k, v in t4["rows"].items()} == {"off": 3.0, "official": 2.0, "full": 1.0}
    adaptation = [f for f in findings(t2, t4) if "stage 3" in f["claim"]][0]
    assert (
        adaptation["verdict"] == "inconclusive"
        and adaptation["difference"] == pytest.approx(1.0)
        and "no per-story evidence" in adaptation["why"]
    )


# ---- the report: reuse, failures, exit codes --------------------------------------------------------------


@pytest.mark.slow
def test_report_lists_failed_runs_completes_the_rest_and_reuses_finished_ones(sequential_report):
    """The session's sequential report (tests/report/conftest.py): four good cells, three that fail."""
    report = sequential_report
    assert report.code == 1
    status = report.runs()
    for policy in POLICIES:
        assert status[CELL.format(policy)]["status"] == "ok", policy
    assert status[CELL.format("mm-sink")]["metrics"]["overall"]["fid"] is not None
    bad_policy = status[CELL.format("nosuch")]
    assert (
        bad_policy["status"] == "failed"
        and "nosuch" in bad_policy["error"]
        and bad_policy["partial"].endswith(".partial.ipynb")
    )
    assert status["99_missing"]["status"] == "failed" and "notebook not found" in status["99_missing"]["error"]
    assert "polcy" in status["07_long_story_ablation-polcy=dense"]["error"]
    assert status["08_report"]["status"] == "ok"
    assert f"FAILED {CELL.format('nosuch')}" in report.stderr
    index = (report.out / "index.md").read_text()
    assert "3 run(s) failed" in index and "Table 2" in index and (report.out / "index.html").is_file()
    assert set(report.summary) >= {"preset", "git_commit", "packages", "wall_seconds", "runs", "table2", "table4"}
    assert "findings" in report.summary and report.summary["machine"]["executor"] == "processes"

    _, failed = run_report("tiny", report.out, report.grid, progress=False, course=False, data_root=SAMPLE)
    again = {r["run"]: r["status"] for r in json.loads((report.out / "summary.json").read_text())["runs"]}
    assert all(again[CELL.format(policy)] == "reused" for policy in POLICIES)
    assert again["08_report"] == "reused" and len(failed) == 3


def test_report_with_a_bad_grid_exits_2_before_any_work(tmp_path, capsys):
    grid = write(tmp_path / "g.yaml", "blocks: 3\n")
    code = main(["report", "--grid", str(grid), "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2 and str(grid) in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_retrained_checkpoints_take_the_place_of_the_committed_ones(monkeypatch, tmp_path):
    from labkit.core.artifacts import locate_artifact
    from labkit.core.paths import CHECKPOINTS_ENV, checkpoints_folder
    from labkit.training.common import artifact_folders

    assert locate_artifact("mllm", "tiny") == project_root() / "checkpoints" / "tiny" / "mllm"
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path))
    assert checkpoints_folder("tiny") == tmp_path
    assert artifact_folders("tiny", "mllm", "reference", None)[0] == tmp_path / "mllm"  # --retrain writes there
    assert locate_artifact("mllm", "tiny") != project_root() / "checkpoints" / "tiny" / "mllm"
    (tmp_path / "mllm").mkdir()
    (tmp_path / "mllm" / "manifest.json").write_text("{}")
    assert locate_artifact("mllm", "tiny") == tmp_path / "mllm"


def _recording_command(folder, fail=()):
    """argv of a job that appends 'start NAME' and 'end NAME' to folder/order.txt (exit 1 for names in `fail`)."""
    import sys

    def command(job):
        code = (
            f"import time, pathlib; p = pathlib.Path({str(folder / 'order.txt')!r}); "
            f"f = open(p, 'a'); f.write('start {job.name}\\n'); f.flush(); time.sleep(0.3); "
            f"f.write('end {job.name}\\n'); f.close(); raise SystemExit({int(job.name in fail)})"
        )
        return [sys.executable, "-c", code]

    return command


def test_retrain_graph_starts_a_stage_only_after_what_it_needs(tmp_path):
    from labkit.report.retrain import Job, run_jobs

    jobs = [Job("tokenizer"), Job("judges"), Job("mllm", ("tokenizer",)), Job("adapt", ("mllm", "judges"))]
    seconds = run_jobs(
        jobs, _recording_command(tmp_path), tmp_path, slots=2, progress=False, done=lambda job, folder: False
    )
    assert set(seconds) == {"tokenizer", "judges", "mllm", "adapt"}
    order = (tmp_path / "order.txt").read_text().split("\n")
    assert order.index("start mllm") > order.index("end tokenizer")
    assert order.index("start adapt") > max(order.index("end mllm"), order.index("end judges"))
    assert order[:2] == ["start tokenizer", "start judges"] or order[:2] == [
        "start judges",
        "start tokenizer",
    ]  # side by side
    assert (tmp_path / "logs" / "mllm.log").is_file()


def test_retrain_graph_stops_at_a_failed_stage_and_names_its_log(tmp_path):
    from labkit.core.errors import LabError
    from labkit.report.retrain import Job, run_jobs

    jobs = [Job("tokenizer"), Job("mllm", ("tokenizer",))]
    with pytest.raises(LabError, match=r"stage tokenizer failed; see .*tokenizer\.log"):
        run_jobs(
            jobs,
            _recording_command(tmp_path, fail=("tokenizer",)),
            tmp_path,
            progress=False,
            done=lambda job, folder: False,
        )
    assert "start mllm" not in (tmp_path / "order.txt").read_text()
    finished = run_jobs(
        jobs, _recording_command(tmp_path), tmp_path, progress=False, done=lambda job, folder: job.name == "tokenizer"
    )
    assert finished["tokenizer"] == 0.0 and finished["mllm"] > 0  # a finished stage is kept, not trained again
    with pytest.raises(LabError, match="unknown stages"):
        run_jobs([Job("mllm", ("nothing",))], _recording_command(tmp_path), tmp_path, progress=False)
    with pytest.raises(LabError, match="wait on each other"):
        run_jobs(
            [Job("a", ("b",)), Job("b", ("a",))],
            _recording_command(tmp_path),
            tmp_path,
            progress=False,
            done=lambda job, folder: False,
        )


def test_retrain_runs_every_stage_and_the_two_sink_emergence_runs():
    from labkit.experiments.sink_emergence import REFERENCE_RUNS
    from labkit.report.retrain import retrain_jobs

    names = [job.name for job in retrain_jobs("reference")]
    assert names[:8] == [
        "visual_tokenizer",
        "judges",
        "lm",
        "vae",
        "mllm",
        "detokenizer",
        "detokenizer_official",
        "detokenizer_full",
    ]
    assert [REFERENCE_RUNS[int(n.rsplit("_", 1)[1])][0] for n in names[8:]] == [", lr 3e-3, wd 0.1"] * 2
    assert len(retrain_jobs("reference", full_study=True)) == 8 + len(REFERENCE_RUNS)
    assert len(retrain_jobs("quick")) == 8


def test_retrained_metrics_are_compared_within_the_stated_tolerance(tmp_path):
    from labkit.report.retrain import compare_checkpoints, outside_tolerance

    def summary(name, fid, clip):
        path = tmp_path / name
        path.write_text(
            json.dumps(
                {
                    "runs": [
                        {"run": "cell", "metrics": {"overall": {"fid": fid, "clip": clip, "lpips": None}}},
                        {"run": "broken", "error": "x"},
                    ]
                }
            )
        )
        return path

    committed = summary("a.json", 5.0, 0.50)
    assert outside_tolerance(committed, summary("b.json", 5.9, 0.54)) == []  # 18% and 0.04: allowed
    lines = outside_tolerance(committed, summary("c.json", 6.1, 0.44))
    assert len(lines) == 2 and lines[0].startswith("cell: fid differs by +1.100 (allowed ±1.000)")
    for folder, accuracy in (("old", 0.5), ("new", 0.6)):
        (tmp_path / folder / "vae").mkdir(parents=True)
        (tmp_path / folder / "vae" / "manifest.json").write_text(
            json.dumps({"metrics": {"test": {"character_accuracy": accuracy, "lpips_backbone": "x"}}})
        )
    assert compare_checkpoints(tmp_path / "old", tmp_path / "new") == {"vae": {"test.character_accuracy": (0.5, 0.6)}}


def test_retrained_weights_are_compared_bit_for_bit(tmp_path):
    from safetensors.torch import save_file

    from labkit.report.retrain import compare_weights

    for folder, value in (("old", 1.0), ("new", 1.0), ("other", 1.0 + 1e-7)):
        for stage in ("vae", "mllm"):
            (tmp_path / folder / stage / "unet").mkdir(parents=True)
            (tmp_path / folder / stage / "manifest.json").write_text("{}")
            save_file({"w": torch.full((3,), value)}, tmp_path / folder / stage / "unet" / "model.safetensors")
    assert compare_weights(tmp_path / "old", tmp_path / "new") == {"mllm": True, "vae": True}
    assert compare_weights(tmp_path / "old", tmp_path / "other") == {"mllm": False, "vae": False}
    (tmp_path / "new" / "vae" / "unet" / "model.safetensors").unlink()  # a file missing on one side is a difference
    assert compare_weights(tmp_path / "old", tmp_path / "new")["vae"] is False


def test_the_index_shows_the_model_sink_and_the_retraining_noise_floor():
    from labkit.report.index import model_markdown
    from labkit.report.run import retraining_variance

    variance = retraining_variance()
    assert variance["cells"] > 0 and variance["largest_change"]["fid"] > 0
    per_layer = {"mean_over_heads": [30.0, 1.0], "strongest_head": [40.0, 2.0]}
    model = {"lm": {}, "mllm": {"bos_ratio": {"captions_before_stage2": per_layer, "captions_after_stage2": per_layer}}}
    text = "\n".join(model_markdown(model, variance))
    assert "30.0, 1.0" in text and "multimodal validation samples | not recorded" in text
    assert "How much retraining moves the numbers" in text and f"fid {variance['largest_change']['fid']:.3g}" in text


def test_table4_carries_stage3_held_out_pairs_and_the_weaker_evidence_decides():
    from labkit.report.findings import _held_out_entry

    gain = {"difference": 0.5, "ci95": [0.2, 0.8]}
    paired = {"n": 40, "fid_gain": gain, "character_accuracy_gain": {"difference": -0.1, "ci95": [-0.3, 0.1]}}
    metrics = {"fid_analogue": 1.0, "character_accuracy": 0.5, "style_accuracy": 0.9}
    manifest = {"metrics": {"test": metrics, "stage1_on_regressed": metrics, "paired": paired}}
    records = [record("mm-sink", "off", fid=3.0), record("mm-sink", "official", fid=2.0)]
    t4 = table4(records, {"official": manifest})
    assert t4["regressed_test_pairs"]["official"]["paired"] == paired
    assert _held_out_entry("official", paired, "fid_gain", "fid")["verdict"] == "reproduced"
    assert _held_out_entry("official", paired, "character_accuracy_gain", "char_acc")["verdict"] == "inconclusive"
    finding = next(f for f in findings(table2(records), t4, records) if "official mode" in f["claim"])
    # the stories give no interval (no per-story units here), so the weaker evidence leaves it inconclusive
    assert finding["verdict"] == "inconclusive"
    assert any("held-out" in e["comparison"] and e["verdict"] == "reproduced" for e in finding["evidence"])


def test_retraining_some_stages_copies_the_others_from_the_committed_references(tmp_path, monkeypatch):
    from labkit.report import retrain

    started = []
    monkeypatch.setenv("LABKIT_CHECKPOINTS", str(tmp_path))  # retrain_all points it at its folder: restore it after
    monkeypatch.setattr(retrain, "ensure_dataset", lambda preset, progress: None)
    monkeypatch.setattr(
        retrain, "run_jobs", lambda jobs, command, folder, slots, env, progress: started.extend(jobs) or {}
    )
    retrain.retrain_all("tiny", tmp_path, progress=False, stages=["lm", "mllm"])
    copied = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert copied == set(retrain.ARTIFACTS) - {"lm", "mllm"}  # what the two retrained stages read, committed
    assert (tmp_path / "sink_emergence.json").is_file()  # the study is copied, not rerun
    assert {job.name for job in started} == set(retrain.ARTIFACTS)  # the copied ones are found done by run_jobs
    assert all(retrain.is_done(retrain.Job(name), tmp_path) for name in copied)
    with pytest.raises(ParameterError, match="retrain-stages"):
        retrain.retrain_all("tiny", tmp_path, progress=False, stages=["llm"])
