"""Interactive explorers a class can drive (issue 14): ipywidgets front ends over labkit's own computations.

Each explorer is one call that returns a widget; notebooks and the Voilà demo app (`make demo`, `demo/`) show the
same objects. Without a front end (papermill, nbval) a widget degrades to its text representation.

- `story_studio`: continue a test story's opening under a policy, segment by segment, with a stop button.
- `kv_cache_explorer`: which entries each KV-cache policy holds, segment by segment.
- `attention_explorer`: where the trained MLLM's attention goes over a long story, by layer, head and segment.
- `rope_clock_explorer`: rotate a key and a query, evict entries, see what re-rotation keeps (paper §3.3).
- `detokenizer_playground`: draw a frame from true, regressed and mixed features; guidance, steps, seed.
- `ablation_browser`: a finished report's Table 2 / Table 4 / stress rows with intervals, curves and strips.

The modules import torch, transformers and the trained parts lazily where they can: `ablation_browser` and
`rope_clock_explorer` need no checkpoint.
"""

from labkit.widgets.ablation_browser import ablation_browser
from labkit.widgets.attention import attention_explorer
from labkit.widgets.detokenizer_playground import detokenizer_playground
from labkit.widgets.kv_cache import kv_cache_explorer
from labkit.widgets.rope_clock import rope_clock_explorer
from labkit.widgets.story_studio import story_studio

__all__ = [
    "ablation_browser",
    "attention_explorer",
    "detokenizer_playground",
    "kv_cache_explorer",
    "rope_clock_explorer",
    "story_studio",
]
