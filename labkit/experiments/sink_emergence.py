"""When does an attention sink emerge? A small study of the levers the literature reports (issue 4, item 7).

Gu et al. (ICLR 2025, "When Attention Sink Emerges in Language Models") find sinks grow with training tokens
and steps, and depend on the data; Guo et al. (2024, active-dormant heads) show a Bigram-Backcopy task - a
random bigram chain in which, after one of a few trigger tokens, the next token copies the token before the
trigger - grows a BOS sink in a small model within minutes: heads that have nothing to do outside triggers
park their attention on BOS. The lab's measured starting point (docs/paper_to_code.md): story text alone left a 2.1 M
Llama with no BOS sink after 12 CPU minutes; Bigram-Backcopy grew one (5× uniform at ~850 steps).

Three data settings train the same `LlamaForCausalLM` (the tiny preset's sizes) and record, every few steps,
each layer's attention on BOS relative to uniform:
- `story`: StoryStream-mini captions of one story packed with `[INST]` separators after `<s>`;
- `story+copy`: the same with triggered-copy pairs inserted at random (a trigger, then a copy of the token
  before it) - the kind of "nothing to do here" positions that make heads dormant;
- `backcopy`: the synthetic Bigram-Backcopy stream.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from labkit.core.presets import PRESETS
from labkit.core.provenance import git_commit, package_versions
from labkit.data.frames import load_frames
from labkit.data.layout import build_layout
from labkit.data.lm_corpus import backcopy_sequence, story_documents, successor_table
from labkit.data.storystream_mini import ensure_dataset, load_tokenizer
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.experiments.cell_scores import nll_within_beyond
from labkit.experiments.story_ablation import CellConfig, training_window_tokens
from labkit.inference.attention import attention_maps_plain, multimodal_bos_ratios, plain_bos_ratios
from labkit.inference.long_context import score_story
from labkit.inference.stream_eval import stream_nll
from labkit.models.mllm import collate, llm_config
from labkit.training.lm import caption_probe

SETTINGS = ("story", "story+copy", "backcopy")
TRIGGERS = 4


@dataclass(frozen=True)
class EmergenceConfig:
    steps: int = 600
    batch_size: int = 8
    length: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    every: int = 100  # measure the sink ratios every this many steps
    copy_rate: float = 0.08  # story+copy: share of positions followed by a trigger-copy pair
    bigram_vocab: int = 256
    seed: int = 0


class StreamData:
    """Token sequences of one setting; vocabulary = the story tokenizer's + TRIGGERS trigger tokens."""

    def __init__(self, setting: str, tokenizer: StoryTokenizer, captions: list[list[str]], config: EmergenceConfig):
        self.setting, self.tokenizer, self.config = setting, tokenizer, config
        self.triggers = list(range(tokenizer.vocab_size, tokenizer.vocab_size + TRIGGERS))
        self.vocab_size = tokenizer.vocab_size + TRIGGERS
        self.stories = story_documents(tokenizer, captions)
        self.successors = successor_table(config.bigram_vocab, config.seed)

    def sequence(self, rng: random.Random) -> list[int]:
        n = self.config.length
        if self.setting == "backcopy":  # here the triggers are extra ids beyond the story tokenizer's vocabulary
            return backcopy_sequence(rng, n, self.tokenizer.bos_id, self.successors, self.triggers)
        story = self.stories[rng.randrange(len(self.stories))]
        start = rng.randrange(max(1, len(story) - n)) if len(story) > n else 0
        body = story[max(1, start) : max(1, start) + n]
        ids = [self.tokenizer.bos_id]
        for token in body:
            ids.append(token)
            if self.setting == "story+copy" and rng.random() < self.config.copy_rate:
                ids += [rng.choice(self.triggers), token]
        return (ids + [self.tokenizer.pad_id] * n)[:n]

    def batch(self, step: int, rows: int) -> torch.Tensor:
        return torch.tensor(
            [self.sequence(random.Random(f"{self.config.seed}/{self.setting}/{step}/{row}")) for row in range(rows)]
        )


def bos_ratios(model: LlamaForCausalLM, batch: torch.Tensor, skip: int = 8) -> tuple[list[float], list[float]]:
    """Attention on position 0 divided by the uniform share 1/(t+1), queries t >= skip: per layer, the mean over
    heads and the strongest head (a sink is often one dormant head, which the mean dilutes)."""
    maps = attention_maps_plain(model, batch)
    positions = torch.arange(batch.shape[1], dtype=torch.float)
    uniform = (1 / (positions[skip:] + 1)).mean()
    per_head = [weights[..., skip:, 0].mean(dim=(0, 2)) / uniform for weights in maps]  # [heads] per layer
    return [float(h.mean()) for h in per_head], [float(h.max()) for h in per_head]


def run_setting(
    setting: str, tokenizer: StoryTokenizer, captions: list[list[str]], config: EmergenceConfig, progress: bool = False
) -> dict:
    """Train one setting; return the BOS-sink curve per layer, the losses and the trained model."""
    from tqdm.auto import tqdm

    data = StreamData(setting, tokenizer, captions, config)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llm_config(PRESETS["tiny"], data.vocab_size))
    model.config.pad_token_id = tokenizer.pad_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    probe = data.batch(-1, 4)
    mean, strongest = bos_ratios(model, probe)
    curve = {"step": [0], "bos_ratio": [mean], "bos_ratio_max_head": [strongest], "loss": []}
    start = time.perf_counter()
    for step in tqdm(range(1, config.steps + 1), desc=setting, disable=not progress):
        model.train()
        batch = data.batch(step, config.batch_size)
        labels = batch.masked_fill(batch == tokenizer.pad_id, -100)
        loss = model(input_ids=batch, labels=labels, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve["loss"].append(loss.item())
        if step % config.every == 0 or step == config.steps:
            curve["step"].append(step)
            mean, strongest = bos_ratios(model.eval(), probe)
            curve["bos_ratio"].append(mean)
            curve["bos_ratio_max_head"].append(strongest)
    curve["seconds"] = time.perf_counter() - start
    return {"setting": setting, "curve": curve, "model": model.eval(), "data": data}


@torch.no_grad()
def window_vs_sink(
    model: LlamaForCausalLM, data: StreamData, tokens: int = 768, window: int = 124, sink: int = 4
) -> dict[str, float]:
    """Mean NLL of a long stream of the setting's data under dense, window and sink caches (last half)."""
    rng = random.Random("stream")
    ids = []
    while len(ids) < tokens:
        ids += data.sequence(rng)[1:] if ids else data.sequence(rng)
    ids = [t for t in ids if t != data.tokenizer.pad_id][:tokens]
    results = {}
    for policy, params in (
        ("dense", {}),
        ("window", {"window": window + sink}),
        ("sink", {"sink": sink, "window": window}),
    ):
        nll = stream_nll(model, ids, policy, params)["nll"]
        results[policy] = float(torch.tensor(nll[len(nll) // 2 :]).mean())
    return results


def run_study(
    config: EmergenceConfig, data_root=None, settings: tuple[str, ...] = SETTINGS, progress: bool = True
) -> dict:
    """Every setting: its BOS-sink curve per layer, its losses, and window vs sink NLL on its own data."""
    from dataclasses import asdict

    root = data_root or ensure_dataset(PRESETS["tiny"], progress)
    tokenizer = load_tokenizer(root)
    captions = load_frames(root, "train").captions
    results = {"config": asdict(config), "git_commit": git_commit(), "packages": package_versions(), "settings": {}}
    for setting in settings:
        run = run_setting(setting, tokenizer, captions, config, progress)
        curve = run["curve"]
        results["settings"][setting] = {
            "steps": curve["step"],
            "bos_ratio": curve["bos_ratio"],
            "loss": curve["loss"][:: max(1, len(curve["loss"]) // 100)],
            "bos_ratio_max_head": curve["bos_ratio_max_head"],
            "max_bos_ratio": max(max(r) for r in curve["bos_ratio"]),
            "max_bos_ratio_head": max(max(r) for r in curve["bos_ratio_max_head"]),
            "seconds": round(curve["seconds"], 1),
            "window_vs_sink_nll": window_vs_sink(run["model"], run["data"]),
            "config": asdict(config),  # settings may be re-run on their own with other steps (CLI --settings)
        }
    return results


# The committed checkpoints/tiny/sink_emergence.json: (name suffix, settings, configuration) in order. The
# default optimiser grows no sink in 800 steps; Bigram-Backcopy is run longer, with 3x the tokens per step,
# and with the optimiser levers Gu et al. report (learning rate, weight decay), which are what grow one.
LEVER = {"lr": 3e-3, "weight_decay": 0.1}
REFERENCE_RUNS = (
    ("", ("story", "story+copy"), {"steps": 800, "every": 100}),
    (", lr 3e-3, wd 0.1", ("story", "story+copy"), {"steps": 800, "every": 100, **LEVER}),
    ("", ("backcopy",), {"steps": 1600, "every": 200}),
    (", batch 24", ("backcopy",), {"steps": 1600, "every": 200, "batch_size": 24}),
    (", lr 3e-3, wd 0.1", ("backcopy",), {"steps": 1600, "every": 200, **LEVER}),
)


# The two runs in which a sink grows (the optimiser levers): what `labkit report --retrain` reproduces by default.
EMERGENCE_RUNS = tuple(i for i, (_, _, fields) in enumerate(REFERENCE_RUNS) if LEVER.items() <= fields.items())


def reference_run(index: int, data_root=None, progress: bool = True) -> dict:
    """Run REFERENCE_RUNS[index]; its settings are named as in the committed file."""
    suffix, settings, fields = REFERENCE_RUNS[index]
    run = run_study(EmergenceConfig(**fields), data_root, settings=settings, progress=progress)
    run["settings"] = {setting + suffix: result for setting, result in run["settings"].items()}
    return run


def merge_runs(runs: list[dict]) -> dict:
    """One study file from several runs: the first run's header, every run's settings."""
    merged = {**runs[0], "settings": {}}
    for run in runs:
        merged["settings"].update(run["settings"])
    return merged


def reference_study(data_root=None, progress: bool = True) -> dict:
    """Every run of REFERENCE_RUNS (about 100 CPU minutes on one thread), named as in the committed file.
    One of them from the CLI: `labkit sink-study --steps 1600 --lr 3e-3 --weight-decay 0.1 --settings backcopy`."""
    return merge_runs([reference_run(index, data_root, progress) for index in range(len(REFERENCE_RUNS))])


# ---- The sink in the trained MLLM (issue 13's target) -------------------------------------------------------------


def mllm_sink_evidence(
    model,
    tokenizer: StoryTokenizer,
    frames,
    features: torch.Tensor,
    llm_folder,
    preset,
    stories: int = 6,
    segments: int = 25,
) -> dict:
    """Where the trained MLLM's BOS sink is, and what evicting it costs, on test stories:

    - `bos_multimodal`: per-layer BOS ratio (queries past position 32) on full multimodal test stories;
    - `bos_plain_captions`: the same for their captions alone, as plain text after `<s>`, fed to the saved
      transformers folder `llm_folder` (what a user gets from `LlamaForCausalLM.from_pretrained`);
    - `teacher_forced`: caption NLL of the ground-truth stories under dense, window, sink and mm-sink, with the
      window at the training length, within it (segments 2-10) and after the first eviction (segments 12-S).
    """
    captions = [story[:segments] for story in frames.captions[:stories]]
    features = features[:stories, :segments]
    layouts = [build_layout(story, tokenizer, preset.mllm.num_queries, [], []) for story in captions]
    batch = collate(layouts, [features[i] for i in range(stories)], tokenizer.pad_id)
    llm = LlamaForCausalLM.from_pretrained(llm_folder).float()
    window = training_window_tokens(tokenizer, frames.captions, preset.data.chunk_length, preset.mllm.num_queries)
    cap = CellConfig().cap  # mm-sink's bound, as in the report grid
    policies = {
        "dense": {},
        "window": {"window": window},
        "sink": {"sink": 4, "window": window},
        "mm-sink": {"sink": 4, "window": window, "cap": cap},
    }
    teacher_forced = {}
    for policy, params in policies.items():
        runs = [score_story(model, tokenizer, captions[i], features[i], policy, params) for i in range(stories)]
        within, beyond = zip(*(nll_within_beyond(r.nll, preset.data.chunk_length) for r in runs))
        teacher_forced[policy] = {
            "params": params,
            "nll_within": sum(within) / stories,
            "nll_beyond": sum(beyond) / stories,
            "per_story_beyond": [round(b, 4) for b in beyond],
        }
    sink_nll, window_nll = teacher_forced["sink"]["nll_beyond"], teacher_forced["window"]["nll_beyond"]
    return {
        "stories": stories,
        "segments": segments,
        "window_tokens": window,
        "bos_multimodal": multimodal_bos_ratios(model, batch, tokenizer),
        "bos_plain_captions": plain_bos_ratios(llm, caption_probe(tokenizer, captions, stories), tokenizer.pad_id),
        "teacher_forced": teacher_forced,
        "window_over_sink_beyond": window_nll / sink_nll,
        "sink_beyond_over_within": sink_nll / teacher_forced["sink"]["nll_within"],
        "mm_sink_beyond_over_within": teacher_forced["mm-sink"]["nll_beyond"] / teacher_forced["mm-sink"]["nll_within"],
    }
