"""Interactive explorers a class can drive (issue 14): ipywidgets front ends over labkit's own computations.

Each explorer is one call that returns a widget; notebooks and the Voilà demo app (`make demo`, `demo/`) show the
same objects. Without a front end (papermill, nbval) a widget degrades to its text representation.

- `rope_clock_explorer`: rotate a key and a query, evict entries, see what re-rotation keeps (paper §3.3).
- `ablation_browser`: a finished report's Table 2 / Table 4 / stress rows with intervals, curves and strips.
- `kv_cache_explorer`: which entries each KV-cache policy holds, segment by segment.
"""

from labkit.widgets.ablation_browser import ablation_browser
from labkit.widgets.kv_cache import kv_cache_explorer
from labkit.widgets.rope_clock import rope_clock_explorer

__all__ = ["ablation_browser", "kv_cache_explorer", "rope_clock_explorer"]
