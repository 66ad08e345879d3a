"""Claims as checks: a sentence of a notebook that quotes a number or an ordering is backed by a cell that compares
it with the value the notebook (or a committed result file) computes, so a retrain that changes the result fails
the notebook under nbval instead of leaving a false sentence behind.

    claim("window NLL after the first eviction", "3.41", study["nll"]["window"])   # rounds to the quoted digits
    claim_order("NLL on its own data", {"sink": 1.67, "dense": 2.73, "window": 3.41}, "sink < dense < window")

`tests/course/test_notebook_claims.py` holds the other half: every number that a "Look for" / "What we see"
paragraph quotes must appear in a claim of the same notebook.

The text quotes the `tiny` preset's results (`TEXT_PRESET`). `labkit report --preset small` (or paper) runs the same
notebooks at another scale, where other numbers are expected: it sets `LABKIT_REPORT_PRESET`, and a claim that does
not hold there prints what the text says beside what this preset computes instead of failing the notebook.
"""

from __future__ import annotations

import math
import os
import re

from labkit.core.errors import LabError
from labkit.core.presets import REPORT_PRESET_ENV

TEXT_PRESET = "tiny"  # the preset whose numbers the notebooks' text quotes
PRESET_ENV = REPORT_PRESET_ENV  # set by `labkit report` for its kernels


def _changed(message: str) -> str:
    """Raise ClaimChanged for the text's preset; at another preset, print the difference and go on."""
    preset = os.environ.get(PRESET_ENV, TEXT_PRESET)
    if preset == TEXT_PRESET:
        raise ClaimChanged(message)
    line = f"· at the {preset} preset (the text quotes {TEXT_PRESET}): {message.split(': reword')[0]}"
    print(line)
    return line


class ClaimChanged(LabError):
    """The notebook's text quotes a number or an ordering that its computed values no longer give."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31mClaimChanged\x1b[0m: {self}"]


def _decimals(quoted: str) -> int:
    digits = re.fullmatch(r"[-+]?\d+(?:\.(\d+))?", quoted.replace(",", ""))
    if digits is None:
        raise LabError(f"claim: quoted value {quoted!r} must be a plain number such as '3.41' or '16'")
    return len(digits.group(1) or "")


def claim(what: str, quoted: str, value: float, percent: bool = False, within: float | None = None) -> str:
    """Check that `value` rounds to the text's `quoted` number (to its digits; `percent`: value is a fraction
    quoted in %). `within` accepts a looser match (an absolute tolerance in the quoted unit) for numbers the text
    rounds coarsely on purpose. Returns the line it prints."""
    shown = 100 * value if percent else value
    decimals = _decimals(quoted)
    target = float(quoted.replace(",", ""))
    tolerance = within if within is not None else 0.5 * 10**-decimals + 1e-9
    if value is None or math.isnan(shown) or abs(shown - target) > tolerance:
        return _changed(
            f"the text says {what} is {quoted}{'%' if percent else ''}, the computed value is now "
            f"{shown:.{decimals + 2}f}{'%' if percent else ''}: reword the markdown above."
        )
    line = f"✓ {what}: {quoted}{'%' if percent else ''} as the text says (computed {shown:.{decimals + 2}f})"
    print(line)
    return line


def claim_order(what: str, values: dict[str, float], order: str) -> str:
    """Check an ordering the text states, written as 'a < b < c' or 'a > b' over the keys of `values`."""
    names = [name.strip() for name in re.split(r"[<>]", order)]
    signs = re.findall(r"[<>]", order)
    missing = [n for n in names if n not in values]
    if missing or len(names) < 2:
        raise LabError(f"claim_order: {order!r} names {missing or names}, not keys of the values {sorted(values)}")
    for left, sign, right in zip(names, signs, names[1:]):
        holds = values[left] < values[right] if sign == "<" else values[left] > values[right]
        if not holds:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            return _changed(
                f"the text says {what}: {order}, but {left} {sign} {right} no longer holds ({shown}): reword the "
                "markdown above."
            )
    line = f"✓ {what}: {order} as the text says"
    print(line)
    return line
