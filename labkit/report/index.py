"""`index.md` and `index.html` of a report: the paper's tables beside the lab's, the findings, the runs.

Pure formatting of `summary.json` (see `labkit.report.run`): every number shown here is in the summary.
"""

from __future__ import annotations


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _verdict(verdict: str) -> str:
    return f"**{verdict}**"


def _interval(ci, digits: int = 3, percent: bool = False) -> str:
    """`[low, high]`, or nothing without an interval."""
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    if percent:
        return f" [{ci[0]:.1%}, {ci[1]:.1%}]"
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _cell(row: dict, metric: str, digits: int = 3, percent: bool = False) -> str:
    """A table cell `value [low, high]` from a row with `ci95`."""
    value = row.get(metric)
    text = _percent(value) if percent else _number(value, digits)
    return text + ("" if value is None else _interval((row.get("ci95") or {}).get(metric), digits, percent))


def table2_markdown(t2: dict) -> list[str]:
    if not t2["rows"]:
        return [f"### Table 2: no {t2['segments']}-segment cells in this report's grid", ""]
    lines = [
        f"### Table 2: attention mechanisms, stories continued to {t2['segments']} segments",
        f"Images drawn with the `{t2['adaptation']}` de-tokenizer; seconds per segment and KV size measured while "
        "generating the same stories (text and regressed features; drawing is not timed). "
        "Paper: Llama-2-7B + SDXL on an A800, story length not "
        "stated; the lab: the tiny preset on this CPU. FID and CLIP are the judge-space analogues, not Inception "
        "FID or CLIP, so only the ordering of policies can be compared with the paper, never the values. "
        "Each lab value is `value [low, high]`: the 95% bootstrap interval over the row's n (seed, story) units "
        "(teacher-forced columns: over its stories); no interval where the cells give no per-unit evidence. "
        "Rows marked *matched budget* ran with the same KV budget as mm-sink.",
        "",
        "| policy | paper FID ↓ | paper CLIP ↑ | paper time (s) | paper memory (GB) | seeds | n "
        "| lab FID-analogue ↓ | lab CLIP-analogue ↑ "
        "| character acc. | style consistency | LPIPS consecutive | s / segment | KV entries @25 | KV bytes @25 "
        "| window | caption NLL beyond training length ↓ | caption PPL (teacher-forced) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, row in t2["rows"].items():
        paper = row.get("paper") or {}
        kv = "n/a" if row.get("kv_bytes") is None else f"{row['kv_bytes'] / 1e6:.2f} MB"
        lines.append(
            f"| `{policy}` | {_number(paper.get('fid'), 2)} | {_number(paper.get('clip'))} "
            f"| {_number(paper.get('seconds'), 2)} "
            f"| {_number(paper.get('memory_gb'), 2)} | {_number(row.get('seeds'))} | {_number(row.get('n'))} "
            f"| {_cell(row, 'fid')} | {_cell(row, 'clip')} "
            f"| {_cell(row, 'char_acc', percent=True)} | {_cell(row, 'style_consistency', percent=True)} "
            f"| {_number(row.get('lpips'))} | {_number(row.get('seconds_per_segment'))} "
            f"| {_number(row.get('kv_entries'), 0)} | {kv} | {_number(row.get('window'), 0)} "
            f"| {_cell(row, 'caption_nll_beyond')} | {_number(row.get('perplexity'))} |"
        )
    return lines + [""]


def table4_markdown(t4: dict) -> list[str]:
    paper = t4["paper"]
    if not t4["rows"] and not t4["regressed_test_pairs"]:
        return ["### Table 4: no adaptation cells in this report's grid", ""]
    lines = [
        f"### Table 4: de-tokenizer adaptation (stage 3), `{t4['policy']}` stories of {t4['segments']} segments",
        f"Paper (App. B): FID {paper['fid_before']} before adaptation, {paper['fid_after']} after. "
        "Lab values are `value [low, high]` (95% bootstrap interval over the n units).",
        "",
        "| de-tokenizer | seeds | n | FID-analogue ↓ | character acc. | style consistency | CLIP-analogue |",
        "|---|---|---|---|---|---|---|",
    ]
    for adaptation, row in t4["rows"].items():
        name = {
            "off": "stage 1 (before)",
            "official": "stage 3, official mode (resampler + to_k/to_v)",
            "full": "stage 3, full fine-tune",
        }[adaptation]
        lines.append(
            f"| {name} | {_number(row.get('seeds'))} | {_number(row.get('n'))} | {_cell(row, 'fid')} "
            f"| {_cell(row, 'char_acc', percent=True)} "
            f"| {_cell(row, 'style_consistency', percent=True)} | {_cell(row, 'clip')} |"
        )
    if t4["regressed_test_pairs"]:
        lines += [
            "",
            "Stage 3's own test (regressed features of held-out (chunk, target) pairs, same seed):",
            "",
            "| mode | FID before → after | identity before → after | style before → after |",
            "|---|---|---|---|",
        ]
        for mode, pair in t4["regressed_test_pairs"].items():
            b, a = pair["before"], pair["after"]
            lines.append(
                f"| {mode} | {b['fid']:.3f} → {a['fid']:.3f} | {b['char_acc']:.1%} → {a['char_acc']:.1%} "
                f"| {b['style']:.1%} → {a['style']:.1%} |"
            )
    return lines + [""]


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def finding_markdown(finding: dict) -> list[str]:
    """One finding: verdict, claim, paper, lab, the difference with its interval and n, why; then its evidence."""
    ci = finding.get("ci95") or [None, None]
    interval = "no interval" if ci[0] is None else f"95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    sentence = (
        f"- {_verdict(finding['verdict'])}: {finding['claim']} Paper: {finding['paper']}. Lab: {finding['lab']}. "
        f"Difference {_signed(finding.get('difference'))} ({interval}, n = {finding.get('n')}; "
        f"{finding.get('definition', finding.get('metric'))})."
    )
    if finding.get("why"):
        sentence += f" Why: {finding['why']}"
    lines = [sentence]
    for entry in finding.get("evidence") or []:
        ci = entry.get("ci95") or [None, None]
        interval = "no interval" if ci[0] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
        line = (
            f"    - {entry['comparison']}, {entry['definition']}: {_signed(entry.get('difference'))} {interval}, "
            f"n = {entry.get('n')}: {entry['verdict']}"
        )
        lines.append(line + (f" ({entry['why']})" if entry.get("why") else ""))
    return lines


def _ratios(block: dict | None) -> str:
    return ", ".join(f"{r:.1f}" for r in block["mean_over_heads"]) if block else "not recorded"


def model_markdown(model: dict | None, variance: dict | None) -> list[str]:
    """Where the model under study has its BOS sink (per layer, from the manifests), and how far one retrain with
    other float rounding moved the report's numbers: the noise floor every verdict below must clear."""
    lines = []
    if model:
        bos = model["mllm"]["bos_ratio"] or {}
        lines += [
            "## The model under study: its attention sink",
            "",
            "Attention from queries past position 32 to BOS, divided by what uniform attention would give it, per "
            "layer (mean over heads; 1 = no sink). The paper's MLLM starts from pretrained Llama-2-7B, which has "
            "sinks in most layers; the lab's starts from its own pre-trained LM (`labkit train lm`).",
            "",
            "| model | probe | BOS ratio per layer |",
            "|---|---|---|",
            f"| LM after pre-training | validation captions as text | {_ratios(bos.get('captions_before_stage2'))} |",
            f"| MLLM after stage 2 | the same captions as text | {_ratios(bos.get('captions_after_stage2'))} |",
            f"| MLLM after stage 2 | multimodal validation samples | {_ratios(bos.get('multimodal_after_stage2'))} |",
            "",
            "`labkit sink-check` measures the same on test stories, and what evicting the sink costs.",
            "",
        ]
    if variance:
        changes = ", ".join(
            f"{metric} {change:.3g}" + (" (relative)" if metric == "fid" else "")
            for metric, change in sorted(variance["largest_change"].items())
        )
        lines += [
            "## How much retraining moves the numbers",
            "",
            f"Retraining every stage with other float rounding (two threads instead of one; `{variance['source']}`, "
            f"{variance['cells']} cells of 25 segments) moved the metrics by up to: {changes} "
            "(absolute unless marked). "
            "Differences between policies smaller than this are within retraining noise whatever their interval "
            "over stories says.",
            "",
        ]
    return lines


def index_markdown(summary: dict) -> str:
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    lines = [
        f"# SEED-Story Lab report: preset `{summary['preset']}`",
        "",
        f"Commit `{summary['git_commit']}`; wall time {summary['wall_seconds']:.0f} s on {summary['device']} "
        f"({summary.get('executed_runs', '?')} notebooks executed, the others reused; the notebooks took "
        f"{summary.get('notebook_seconds', 0):.0f} s in all when they ran, "
        f"{summary.get('machine', {}).get('notebook_workers', 1)} at a time). "
        "Regenerate with `make report` (reuses finished runs) or `labkit report --retrain` (every stage from scratch).",
        "",
    ]
    if failed:
        lines += [f"**{len(failed)} run(s) failed** (listed under Runs); the tables use the runs that finished.", ""]
    judges = summary.get("judges")
    if judges:
        lines += [
            "## The judges (they score everything below)",
            f"Held-out test frames: character classifier {judges['test_character_accuracy']:.1%}, style classifier "
            f"{judges['test_style_accuracy']:.1%}, image-text retrieval top-1 {judges['test_clip_top1']:.1%} "
            f"(top-5 {judges['test_clip_top5']:.1%}, chance {judges['test_clip_chance_top1']:.1%}). "
            "The accuracy metrics below are "
            "only as good as these.",
            "",
        ]
    lines += model_markdown(summary.get("model"), summary.get("retraining_variance"))
    lines += (
        ["## The paper's tables beside the lab's", ""]
        + table2_markdown(summary["table2"])
        + table4_markdown(summary["table4"])
    )
    if summary.get("stress"):
        lines += [
            "### Stress: 100 segments (ten times the training length)",
            "",
            "| policy | n | time at segment ~100 / at ~10 | KV bytes @10 → @100 | character acc. | FID-analogue |",
            "|---|---|---|---|---|---|",
        ]
        for policy, row in summary["stress"].items():
            lines.append(
                f"| `{policy}` | {_number(row.get('n'))} | {row['seconds_ratio_100_vs_10']:.2f}x "
                f"| {row['kv_bytes_10'] / 1e6:.2f} → {row['kv_bytes_100'] / 1e6:.2f} MB "
                f"| {_cell(row, 'char_acc', percent=True)} | {_cell(row, 'fid')} |"
            )
        lines.append("")
    lines += [
        "## Findings",
        "",
        "Each finding compares two policies (or de-tokenizers) over the same n units (seed, story), paired unit by "
        "unit; the difference is signed so that a positive value is what the claim says. A verdict is "
        "`reproduced` only if the 95% interval of the difference excludes 0 in the paper's direction, "
        "`contradicted` if it excludes 0 in the other direction, and `inconclusive` otherwise (also when there is "
        "no interval, and for CLIP-analogue comparisons while the image-text judge is below its trust bar). "
        "The first metric decides; the indented lines are further evidence, each with its own interval. "
        "Intervals use a fixed bootstrap seed, so two reports of the same cells agree exactly; speed verdicts "
        "need repeated timings, since wall-clock times vary between runs and machines.",
        "",
    ]
    for finding in summary["findings"]:
        lines += finding_markdown(finding)
    lines += ["", "## Runs", "", "| run | status | seconds | notebook | HTML |", "|---|---|---|---|---|"]
    for run in summary["runs"]:
        status = (
            run["status"]
            if run["status"] != "failed"
            else f"failed: {run['error']} (partial notebook: `{run.get('partial')}`)"
        )
        links = (
            (f"[ipynb](executed/{run['run']}.ipynb)", f"[html](html/{run['run']}.html)")
            if run["status"] != "failed"
            else ("", "")
        )
        lines.append(f"| `{run['run']}` | {status} | {run['seconds']:.1f} | {links[0]} | {links[1]} |")
    return "\n".join(lines) + "\n"


def index_html(markdown: str) -> str:
    import mistune  # comes with nbconvert

    body = mistune.create_markdown(plugins=["table"])(markdown)
    return (
        "<!doctype html><meta charset='utf-8'><title>SEED-Story Lab report</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px}</style>" + body
    )
