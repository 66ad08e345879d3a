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


def _verdict(reproduced) -> str:
    return {True: "**reproduced**", False: "**not reproduced**", "partial": "**partly reproduced**"}.get(
        reproduced, str(reproduced)
    )


def table2_markdown(t2: dict) -> list[str]:
    if not t2["rows"]:
        return [f"### Table 2: no {t2['segments']}-segment cells in this report's grid", ""]
    lines = [
        f"### Table 2: attention mechanisms, stories continued to {t2['segments']} segments",
        f"Images drawn with the `{t2['adaptation']}` de-tokenizer; seconds per segment and KV bytes measured while "
        "generating the same stories (text and regressed features; drawing is not timed). "
        "Paper: Llama-2-7B + SDXL on an A800, story length not "
        "stated; the lab: the tiny preset on this CPU. FID and CLIP are the judge-space analogues, not Inception "
        "FID or CLIP, so only the ordering of policies can be compared with the paper, never the values.",
        "",
        "| policy | paper FID ↓ | paper CLIP ↑ | paper time (s) | paper memory (GB) "
        "| lab FID-analogue ↓ | lab CLIP-analogue ↑ "
        "| character acc. | style consistency | LPIPS consecutive | s / segment | KV bytes @25 "
        "| caption PPL (teacher-forced) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, row in t2["rows"].items():
        paper = row.get("paper") or {}
        kv = "n/a" if row["kv_bytes"] is None else f"{row['kv_bytes'] / 1e6:.2f} MB"
        lines.append(
            f"| `{policy}` | {_number(paper.get('fid'), 2)} | {_number(paper.get('clip'))} "
            f"| {_number(paper.get('seconds'), 2)} "
            f"| {_number(paper.get('memory_gb'), 2)} | {_number(row['fid'])} | {_number(row['clip'])} "
            f"| {_percent(row['char_acc'])} "
            f"| {_percent(row['style_consistency'])} | {_number(row['lpips'])} | {_number(row['seconds_per_segment'])} "
            f"| {kv} | {_number(row['perplexity'])} |"
        )
    return lines + [""]


def table4_markdown(t4: dict) -> list[str]:
    paper = t4["paper"]
    if not t4["rows"] and not t4["regressed_test_pairs"]:
        return ["### Table 4: no adaptation cells in this report's grid", ""]
    lines = [
        f"### Table 4: de-tokenizer adaptation (stage 3), `{t4['policy']}` stories of {t4['segments']} segments",
        f"Paper (App. B): FID {paper['fid_before']} before adaptation, {paper['fid_after']} after.",
        "",
        "| de-tokenizer | FID-analogue ↓ | character acc. | style consistency | CLIP-analogue |",
        "|---|---|---|---|---|",
    ]
    for adaptation, row in t4["rows"].items():
        name = {
            "off": "stage 1 (before)",
            "official": "stage 3, official mode (resampler + to_k/to_v)",
            "full": "stage 3, full fine-tune",
        }[adaptation]
        lines.append(
            f"| {name} | {_number(row['fid'])} | {_percent(row['char_acc'])} "
            f"| {_percent(row['style_consistency'])} | {_number(row['clip'])} |"
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


def index_markdown(summary: dict) -> str:
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    lines = [
        f"# SEED-Story Lab report: preset `{summary['preset']}`",
        "",
        f"Commit `{summary['git_commit']}`; wall time {summary['wall_seconds']:.0f} s on {summary['device']}. "
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
    lines += (
        ["## The paper's tables beside the lab's", ""]
        + table2_markdown(summary["table2"])
        + table4_markdown(summary["table4"])
    )
    if summary.get("stress"):
        lines += [
            "### Stress: 100 segments (ten times the training length)",
            "",
            "| policy | time at segment ~100 / at ~10 | KV bytes @10 → @100 | character acc. | FID-analogue |",
            "|---|---|---|---|---|",
        ]
        for policy, row in summary["stress"].items():
            lines.append(
                f"| `{policy}` | {row['seconds_ratio_100_vs_10']:.2f}x "
                f"| {row['kv_bytes_10'] / 1e6:.2f} → {row['kv_bytes_100'] / 1e6:.2f} MB "
                f"| {_percent(row['char_acc'])} | {_number(row['fid'])} |"
            )
        lines.append("")
    lines += [
        "## Findings",
        "",
        "Verdicts on image and text metrics are fixed by the seed (two runs of the same report agree exactly); "
        "verdicts on speed use one run's wall-clock times, which vary between runs and machines, so a speed "
        "ratio near 1 can flip between reports.",
        "",
    ]
    for finding in summary["findings"]:
        sentence = (
            f"- {finding['claim']} {_verdict(finding['reproduced'])} at tiny scale. "
            f"Paper: {finding['paper']}. Lab: {finding['lab']}."
        )
        if finding.get("why_not"):
            sentence += f" Why not fully: {finding['why_not']}"
        lines.append(sentence)
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
