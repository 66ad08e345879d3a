"""What every explorer shares: a plot area that shows a clear message for bad input (never a traceback) and the
figure otherwise, and how long the last update took (the browser tests and BENCHMARKS read it)."""

from __future__ import annotations

import time
from typing import Callable

from labkit.core.errors import LabError

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
        """Clear, call `draw` (it returns a matplotlib figure, or a string to print), show it; True when it drew.
        A `USER_ERRORS` exception becomes a red one-line message in the widget."""
        import matplotlib.pyplot as plt
        from IPython.display import display
        from matplotlib.figure import Figure

        start = time.perf_counter()
        self.output.clear_output(wait=True)
        self.message.value = ""
        with self.output:
            try:
                result = draw()
            except USER_ERRORS as error:
                self.message.value = f'<span style="color:#b00020" class="labkit-error">{_escape(str(error))}</span>'
                result = None
            if isinstance(result, str):
                print(result)
            elif result is not None:
                result = result if isinstance(result, Figure) else result.figure  # a plot may return its Axes
                figure = result
                display(figure)
                plt.close(figure)
        self.seconds.value = round(time.perf_counter() - start, 3)
        self.last = result
        return result is not None


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def parse_int(text: str, name: str, low: int | None = None, high: int | None = None) -> int:
    """An integer typed in a text box, or ValueError naming the control and what it accepts."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: must be between {low} and {high} (got {value})")
    return value
