r"""`labkit stream-eval`: the attention_sinks benchmark on any local Llama-family causal LM (issue 4, item 8).

A long text is streamed one token at a time through each KV-cache policy; for every token we record its
negative log-likelihood, the bytes the cache holds and the latency. This is where users with real weights see
what tiny models lack: attention_sinks measured on Llama-2-7B that window attention's perplexity explodes
(5.79 -> 86.6 by 1,850 tokens, window 1,024) as soon as the first tokens leave the cache, while a 4-token sink
stays flat (5.6-5.8) and dense attention degrades past the pre-training length (4k) with growing memory.

    labkit stream-eval --model /path/to/Llama-2-7b-hf --text book.txt --tokens 4000 \
        --window 1020 --sink 4 --json curves.json

Models load with `from_pretrained(..., local_files_only=True)`: nothing downloads.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from labkit.caches import forward_with_cache, make_cache
from labkit.core.errors import LabError, ParameterError

STREAM_POLICIES = ("dense", "window", "sink")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A local Llama-family model and its tokenizer (`transformers` Auto classes, offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise LabError(
            f"{folder / 'config.json'}: not found; --model must be a local model folder (e.g. Llama-2-7b-hf)"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None  # a weights-only folder: the caller passes token ids
    return model, tokenizer


@torch.no_grad()
def stream_nll(
    model, token_ids: list[int], policy: str, params: dict, progress: bool = False
) -> dict[str, list[float]]:
    """Feed `token_ids` one by one through a `policy` cache; per token: NLL of the next token, cache bytes, seconds."""
    if len(token_ids) < 2:
        raise ParameterError("--tokens", "need at least 2 tokens to score")
    cache = make_cache(policy, model.config, **params)
    device = next(model.parameters()).device
    nll, kv_bytes, seconds = [], [], []
    for index in tqdm(range(len(token_ids) - 1), desc=policy, disable=not progress):
        start = time.perf_counter()
        logits = (
            forward_with_cache(model, cache, torch.tensor([[token_ids[index]]], device=device)).logits[0, -1].float()
        )
        seconds.append(time.perf_counter() - start)
        nll.append(float(F.cross_entropy(logits[None], torch.tensor([token_ids[index + 1]], device=device))))
        kv_bytes.append(cache.nbytes())
    return {"nll": nll, "kv_bytes": kv_bytes, "seconds": seconds}


def stream_eval(
    model,
    token_ids: list[int],
    policies: tuple[str, ...] = STREAM_POLICIES,
    window: int = 1020,
    sink: int = 4,
    progress: bool = True,
) -> dict:
    """Curves for each policy, plus the running perplexity, as attention_sinks' `perplexity.py` reports them."""
    unknown = [p for p in policies if p not in STREAM_POLICIES]
    if unknown:
        raise ParameterError("--policies", f"unknown {unknown}; stream-eval compares {', '.join(STREAM_POLICIES)}")
    sizes = {"dense": {}, "window": {"window": window}, "sink": {"sink": sink, "window": window}}
    curves = {}
    for policy in policies:
        run = stream_nll(model, token_ids, policy, sizes[policy], progress)
        running = [math.exp(sum(run["nll"][: i + 1]) / (i + 1)) for i in range(len(run["nll"]))]
        curves[policy] = {**run, "params": sizes[policy], "running_ppl": running}
    return {"tokens": len(token_ids), "window": window, "sink": sink, "curves": curves}


def plot_stream_eval(result: dict, smooth: int = 64):
    """Log-perplexity (moving average), KV bytes and latency against input length, one line per policy."""
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for policy, curve in result["curves"].items():
        nll = np.asarray(curve["nll"])
        width = max(1, min(smooth, len(nll)))
        moving = np.convolve(nll, np.ones(width) / width, mode="valid")
        axes[0].plot(np.arange(len(moving)) + width, moving, label=policy)
        axes[1].plot(np.asarray(curve["kv_bytes"]) / 2**20, label=policy)
        axes[2].plot(np.asarray(curve["seconds"]) * 1000, label=policy, alpha=0.7)
    axes[0].set(title=f"NLL per token (moving average of {smooth})", xlabel="input length")
    axes[1].set(title="KV cache (MiB)", xlabel="input length")
    axes[2].set(title="latency per token (ms)", xlabel="input length")
    for axis in axes:
        axis.axvline(result["window"] + result["sink"], color="grey", lw=0.8, ls=":")
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
