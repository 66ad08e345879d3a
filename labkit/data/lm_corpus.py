"""The text the lab's language model is pre-trained on before stage 2 (`labkit train lm`).

SEED-Story's MLLM starts from a *pretrained* Llama-2-7B (paper §3.2), which already puts a large share of its
attention on the first token in most layers: the attention sink that StreamingLLM keeps and the paper's
multimodal sink builds on. The tiny Llama has no such past, so the lab gives it one, on text it makes itself:

- **story text**: the training stories' captions (`[INST]` between segments, as stage 2 lays them out) and the
  per-frame descriptions (`labkit.data.descriptions`), each document after `<s>`;
- **Bigram-Backcopy** (Guo et al. 2024, "active-dormant attention heads"): a random bigram chain in which, after
  one of a few trigger tokens, the next token copies the token before the trigger. Outside the triggers most
  heads have nothing to do, and they learn to park their attention on `<s>`: a sink grows within minutes on a
  CPU (`labkit.experiments.sink_emergence`, where the lab measured that story text alone does not grow one).

A row of a batch is a Bigram-Backcopy sequence with probability `backcopy_share`, otherwise a story document.
Every row is a pure function of (seed, step, row), so an interrupted run resumes on the same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from labkit.data.text_tokenizer import StoryTokenizer

BIGRAM_OFFSET = 300  # bigram tokens are ordinary BPE ids above the byte and special tokens
SUCCESSORS = 4  # each bigram token has this many likely successors


@dataclass(frozen=True)
class CorpusConfig:
    length: int = 256  # tokens per row, `<s>` included
    backcopy_share: float = 0.5  # share of rows that are Bigram-Backcopy sequences
    bigram_vocab: int = 256
    trigger_rate: float = 0.1  # chance, at each position, of a (trigger, copy) pair
    seed: int = 0


def successor_table(bigram_vocab: int, seed: int) -> torch.Tensor:
    """[bigram_vocab, SUCCESSORS]: the sparse random transition table of the bigram chain."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, bigram_vocab, (bigram_vocab, SUCCESSORS), generator=generator)


def backcopy_sequence(
    rng: random.Random,
    length: int,
    bos_id: int,
    successors: torch.Tensor,
    triggers: Sequence[int],
    trigger_rate: float = 0.1,
    offset: int = BIGRAM_OFFSET,
) -> list[int]:
    """`<s>`, then a bigram chain in which a trigger is always followed by a copy of the token before it."""
    ids = [bos_id]
    current = rng.randrange(successors.shape[0])
    while len(ids) < length:
        if len(ids) > 2 and rng.random() < trigger_rate:
            ids += [rng.choice(triggers), ids[-1]]
        else:
            current = int(successors[current, rng.randrange(SUCCESSORS)])
            ids.append(offset + current)
    return ids[:length]


def story_documents(
    tokenizer: StoryTokenizer, captions: list[list[str]], descriptions: list[list[str]] | None = None
) -> list[list[int]]:
    """One document per story's captions (`[INST]` between segments) and one per story's descriptions."""
    documents = []
    for story in captions + (descriptions or []):
        ids = [tokenizer.bos_id]
        for index, text in enumerate(story):
            ids += (tokenizer.inst_ids if index else []) + tokenizer.encode(text)  # Llama-2: several pieces
        documents.append(ids)
    return documents


class LMCorpus:
    """Rows of the pre-training corpus; the triggers are four ordinary token ids just above the bigram range,
    so the vocabulary stays the story tokenizer's and the model drops into the MLLM unchanged."""

    def __init__(self, tokenizer: StoryTokenizer, documents: list[list[int]], config: CorpusConfig):
        if not 0.0 <= config.backcopy_share <= 1.0:
            raise ValueError(f"backcopy_share must lie in [0, 1], got {config.backcopy_share}")
        # a small tokenizer (tests) gets a smaller bigram range; the tiny preset's has room for all 256
        self.bigram_vocab = min(config.bigram_vocab, tokenizer.vocab_size - BIGRAM_OFFSET - 4)
        if self.bigram_vocab < 16:
            raise ValueError(f"the tokenizer's {tokenizer.vocab_size} ids leave no room for the bigram tokens")
        self.tokenizer, self.documents, self.config = tokenizer, documents, config
        first_trigger = BIGRAM_OFFSET + self.bigram_vocab
        self.triggers = list(range(first_trigger, first_trigger + 4))
        self.successors = successor_table(self.bigram_vocab, config.seed)

    def backcopy(self, rng: random.Random) -> list[int]:
        config = self.config
        return backcopy_sequence(
            rng, config.length, self.tokenizer.bos_id, self.successors, self.triggers, config.trigger_rate
        )

    def story(self, rng: random.Random) -> list[int]:
        """A window of a random document, always starting with `<s>`, padded to the row length."""
        document, n = self.documents[rng.randrange(len(self.documents))], self.config.length
        start = rng.randrange(1, len(document) - n + 2) if len(document) > n else 1
        ids = [self.tokenizer.bos_id] + document[start : start + n - 1]
        return ids + [self.tokenizer.pad_id] * (n - len(ids))

    def sequence(self, rng: random.Random) -> list[int]:
        return self.backcopy(rng) if rng.random() < self.config.backcopy_share else self.story(rng)

    def batch(self, step: int, rows: range | Sequence[int]) -> torch.Tensor:
        """Token ids [len(rows), length]; padding is the tokenizer's pad id (give it no loss)."""
        seed = self.config.seed
        return torch.tensor([self.sequence(random.Random(f"lm/{seed}/{step}/{row}")) for row in rows])
