"""What every explorer shares: a plot area that shows a clear message for bad input (never a traceback) and the
figure otherwise, and how long the last update took (the browser tests and BENCHMARKS read it)."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable

from labkit.core.errors import LabError
from labkit.core.presets import get_preset
from labkit.experiments.story_ablation import load_inputs

# Mistakes a user can make with a control: shown as one line in the widget. Anything else is a bug and raises.
USER_ERRORS = (LabError, ValueError, FileNotFoundError)


class PlotArea:
    """An `ipywidgets.Output` that `render` fills with `draw()`'s figure (or its message), timing each update."""

    def __init__(self):
        import ipywidgets as widgets

        self.output = widgets.Output()
        self.message = widgets.HTML()
        self.seconds = widgets.FloatText(description="update (s)", disabled=True, layout={"width": "180px"})
        self.box = widgets.VBox([self.message, self.output, self.seconds])
        self.last = None  # what the last update showed (a figure, a text, None): tests read it without a front end

    def render(self, draw: Callable[[], object]) -> bool:
        """Call `draw` (it returns a matplotlib figure or its Axes, or a string to print) and show what it returns
        in place of the last one; True when it drew. A `USER_ERRORS` exception becomes a red one-line message in
        the widget. Works from any thread (the story studio draws from its writer thread): outputs are set on the
        widget, never captured with `with output:`, which only works in the kernel's main thread."""
        import io

        import matplotlib.pyplot as plt
        from IPython.display import Image
        from matplotlib.figure import Figure

        start = time.perf_counter()
        self.message.value = ""
        try:
            result = draw()
        except USER_ERRORS as error:
            self.message.value = error_html(str(error))
            result = None
        self.output.outputs = ()
        if isinstance(result, str):
            self.output.append_stdout(result + "\n")
        elif result is not None:
            result = result if isinstance(result, Figure) else result.figure  # a plot may return its Axes
            buffer = io.BytesIO()
            result.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
            plt.close(result)
            self.output.append_display_data(Image(data=buffer.getvalue(), format="png"))
        self.seconds.value = round(time.perf_counter() - start, 3)
        self.last = result
        return result is not None


def explorer(controls: dict, area: PlotArea, draw: Callable[[], object], rows: list[int]):
    """The usual explorer: every control redraws `area` with `draw`, drawn once now; the controls laid out in
    rows of the given sizes above the plot area. The returned box carries `area` (tests and notebooks read it)."""
    import ipywidgets as widgets

    for control in controls.values():
        control.observe(lambda change: area.render(draw), names="value")
    area.render(draw)
    widgets_in_order, boxes, start = list(controls.values()), [], 0
    for size in rows:
        boxes.append(widgets.HBox(widgets_in_order[start : start + size]))
        start += size
    box = widgets.VBox([*boxes, area.box])
    box.area = area
    return box


def error_html(text: str) -> str:
    """A one-line message for an `ipywidgets.HTML`, red, with the class the browser tests look for."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f'<span style="color:#b00020" class="labkit-error">{escaped}</span>'


def parse_int(text: str, name: str, low: int | None = None, high: int | None = None) -> int:
    """An integer typed in a text box, or ValueError naming the control and what it accepts."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: must be between {low} and {high} (got {value})")
    return value


@lru_cache(maxsize=2)
def reference_inputs(preset: str = "tiny"):
    """The reference MLLM, judges and test split (`story_ablation.CellInputs`), loaded once per process: every
    explorer that needs the trained model shares them."""
    return load_inputs(get_preset(preset), progress=False)
