"""The story studio: continue a test story's opening under a KV-cache policy and watch it being written (paper §3.3).

Each segment appears as soon as it is written: its caption, its picture (the `full` stage-3 de-tokenizer) and how
many KV entries the cache holds (it fills, then the policy evicts). A stop button ends the story where it is. When
the opening is a test story's own, the ground-truth story is also teacher-forced under the same policy and its
per-segment caption NLL and image-feature error are plotted (the report's teacher-forced columns). Compare mode
writes the same opening under a second policy below the first.
"""

from __future__ import annotations

import threading

from labkit.core.presets import get_preset
from labkit.data.layout import build_layout
from labkit.experiments.cache_trace import policy_params
from labkit.experiments.story_ablation import load_detokenizer
from labkit.inference.generate import STRATEGIES, StopGeneration, generate_stories, layout_cache_params
from labkit.inference.long_context import score_story
from labkit.widgets.common import USER_ERRORS, PlotArea, error_html, parse_int, reference_inputs

MAX_SEGMENTS = 100


def check_settings(opening: str, policy: str, window: int, sink: int, segments: int, story_tokens: int) -> None:
    """ValueError naming the control for settings the studio cannot run (or that would make the policy moot)."""
    if not opening.strip():
        raise ValueError("opening: write a first caption (it is empty)")
    if policy not in STRATEGIES:
        raise ValueError(f"policy: choose one of {', '.join(STRATEGIES)} (got {policy!r})")
    if not 2 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"segments: must be between 2 and {MAX_SEGMENTS} (got {segments})")
    if window < 1 or sink < 0 or (policy in ("sink", "mm-sink") and window < sink):
        raise ValueError(f"window: must be at least 1 and at least the sink size ({sink}), got {window}")
    if policy in ("window", "sink", "mm-sink") and window >= story_tokens:
        raise ValueError(
            f"window: {window} tokens hold the whole {segments}-segment story (about {story_tokens} tokens): the "
            f"cache would never evict; pick fewer than {story_tokens}"
        )


def cache_params(policy: str, window: int, sink: int) -> dict:
    """The sizes the studio gives each policy (mm-sink's cap: the window, the sink and 128 boundary entries)."""
    return policy_params(policy, window=window, sink=sink, cap=window + sink + 128)


class StoryStudio:
    """The studio's controls, its streaming writer thread and its views."""

    def __init__(self, preset: str = "tiny", inputs=None):
        import ipywidgets as widgets

        self.config, self.inputs = get_preset(preset), inputs or reference_inputs(preset)
        self.detokenizer = load_detokenizer("full", self.config)
        frames = self.inputs.frames
        stories = [(f"{k}: {frames.captions[k][0][:50]}…", k) for k in range(frames.stories)]
        self.controls = {
            "story": widgets.Dropdown(options=stories, value=0, description="test story"),
            "opening": widgets.Textarea(value=frames.captions[0][0], description="opening", layout={"width": "640px"}),
            "policy": widgets.Dropdown(options=list(STRATEGIES), value="mm-sink", description="policy"),
            "compare": widgets.Dropdown(options=["none", *STRATEGIES], value="none", description="compare with"),
            "window": widgets.IntText(value=315, description="window"),
            "sink": widgets.IntText(value=4, description="sink"),
            "segments": widgets.IntSlider(value=25, min=2, max=MAX_SEGMENTS, description="segments"),
            "seed": widgets.Text(value="0", description="seed"),
        }
        self.controls["story"].observe(lambda change: self._take_opening(), names="value")
        self.run_button = widgets.Button(description="Write", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.run_button.on_click(lambda button: self.start())
        self.stop_button.on_click(lambda button: self.stop())
        self.progress = widgets.IntProgress(value=0, min=0, max=25, description="segments")
        self.status = widgets.HTML()
        self.rows = widgets.VBox()  # one strip of segments per policy
        self.scores = PlotArea()  # the teacher-forced curves, when the opening is a test story's own
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.runs: dict[str, list] = {}
        c = list(self.controls.values())
        self.widget = widgets.VBox(
            [
                widgets.HBox(c[:1]),
                c[1],
                widgets.HBox(c[2:4]),
                widgets.HBox(c[4:7]),
                widgets.HBox([c[7], self.run_button, self.stop_button]),
                widgets.HBox([self.progress, self.status]),
                self.rows,
                self.scores.box,
            ]
        )
        self.widget.studio = self

    def _take_opening(self) -> None:
        self.controls["opening"].value = self.inputs.frames.captions[self.controls["story"].value][0]

    def settings(self) -> dict:
        """The controls' values, checked (ValueError naming the control)."""
        v = {name: control.value for name, control in self.controls.items()}
        v["seed"] = parse_int(v["seed"], "seed", 0, 2**31 - 1)
        story = self.inputs.frames.captions[v["story"]]
        tokens_per_segment = len(build_layout(story, self.inputs.tokenizer, self.inputs.model.num_queries, (), ()))
        story_tokens = round(tokens_per_segment / len(story) * v["segments"])
        for policy in {v["policy"], v["compare"]} - {"none"}:
            check_settings(v["opening"], policy, v["window"], v["sink"], v["segments"], story_tokens)
        return {**v, "story_tokens": story_tokens}

    def start(self, blocking: bool = False) -> None:
        """Check the settings and write the story (in a thread, so the stop button and the page stay live)."""
        if self.thread is not None and self.thread.is_alive():
            return
        self.status.value = ""
        try:
            settings = self.settings()
        except USER_ERRORS as error:
            self.status.value = error_html(str(error))
            return
        self._stop.clear()
        self.rows.children = []
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.thread = threading.Thread(target=self._write, args=(settings,), daemon=True)
        self.thread.start()
        if blocking:
            self.thread.join()

    def stop(self) -> None:
        self._stop.set()

    def _write(self, v: dict) -> None:
        import ipywidgets as widgets

        try:
            features = self.inputs.features[v["story"], 0]
            policies = [v["policy"]] + ([v["compare"]] if v["compare"] != "none" else [])
            self.progress.max = v["segments"] * len(policies)
            self.progress.value = 0
            for policy in policies:
                strip = widgets.HBox(layout={"overflow_x": "auto", "width": "100%"})
                self.rows.children = [*self.rows.children, widgets.HTML(f"<b>{policy}</b>"), strip]
                sizes = cache_params(policy, v["window"], v["sink"])
                # the bar under each picture: entries held against the most the policy may hold (or the story)
                limit = sizes.get("cap") or sizes.get("window", 0) + sizes.get("sink", 0) or v["story_tokens"]
                params = layout_cache_params(policy, sizes, *self._model())
                self.runs[policy] = generate_stories(
                    *self._model(),
                    [(v["opening"], features)],
                    v["segments"],
                    policy,
                    params,
                    on_segment=lambda runs, strip=strip, limit=limit: self._show_segment(
                        runs[0], strip, v["seed"], limit
                    ),
                )
                if self._stop.is_set():
                    break
            self.status.value = "stopped" if self._stop.is_set() else "done"
            if v["opening"] == self.inputs.frames.captions[v["story"]][0]:
                self.scores.render(lambda: self._teacher_forced(v, policies))
        except Exception as error:  # a thread's exception would vanish: show it in the widget
            self.status.value = error_html(f"{type(error).__name__}: {error}")
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True

    def _model(self):
        return self.inputs.model, self.inputs.tokenizer

    def _show_segment(self, run, strip, seed: int, limit: int) -> None:
        import io

        import ipywidgets as widgets
        from PIL import Image

        segment = len(run.captions)
        image = self.detokenizer.sample(run.features[-1][None], steps=10, guidance_scale=3.0, seed=seed + segment)[0]
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize((128, 128), Image.NEAREST).save(buffer, format="PNG")
        step = run.steps[-1]
        card = widgets.VBox(
            [
                widgets.Image(value=buffer.getvalue(), format="png", layout={"width": "128px"}),
                widgets.HTML(
                    f"<div style='width:128px;font-size:11px'><b>{segment}</b> {run.captions[-1]}<br>"
                    f"<span style='color:#555'>KV {step.kv_entries} / {limit} entries</span>"
                    f"<div style='background:#ddd;width:120px;height:6px'><div style='background:#4c72b0;"
                    f"width:{min(120, round(120 * step.kv_entries / limit))}px;height:6px'></div></div></div>"
                ),
            ]
        )
        strip.children = [*strip.children, card]
        self.progress.value += 1
        if self._stop.is_set():
            raise StopGeneration

    def _teacher_forced(self, v: dict, policies: list[str]):
        import matplotlib.pyplot as plt

        frames, features = self.inputs.frames, self.inputs.features
        segments = min(v["segments"], frames.frames)
        figure, (nll, error) = plt.subplots(1, 2, figsize=(11, 3))
        for policy in policies:
            scores = score_story(
                *self._model(),
                frames.captions[v["story"]][:segments],
                features[v["story"], :segments],
                policy,
                cache_params(policy, v["window"], v["sink"]),
            )
            nll.plot(range(1, segments + 1), scores.nll, marker=".", label=policy)
            error.plot(range(1, segments + 1), scores.cosine_error, marker=".", label=policy)
        for axis, title in ((nll, "caption NLL"), (error, "image-feature cosine error")):
            axis.axvline(self.config.data.chunk_length + 0.5, color="grey", ls=":", lw=0.8)
            axis.set(xlabel="segment", title=f"{title}, the ground-truth story teacher-forced")
            axis.legend(fontsize=8)
        figure.tight_layout()
        return figure


def story_studio(preset: str = "tiny", inputs=None):
    """The studio's widget (its `StoryStudio` is `widget.studio`). `inputs`: a `story_ablation.CellInputs` already
    loaded (a notebook's), else the reference model and the preset's test split."""
    return StoryStudio(preset, inputs).widget
