"""The text tokenizer: byte-level BPE trained with `tokenizers` on the training captions.

SEED-Story extends Llama-2's SentencePiece vocabulary (32000) with 66 tokens: `<img>`, `</img>` and
`<img_00000>`..`<img_00063>`, one per image query (`src/models_clm/models.py`). The lab does the same on a small BPE
vocabulary. One difference, for short tiny-preset sequences: `[INST]`, plain text in the official code
(several SentencePiece pieces), is one special token here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from labkit.core.atomic import write_text
from labkit.core.errors import LabError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
BOI, EOI = "<img>", "</img>"  # begin / end of image
INST = "[INST]"  # the official segment separator
CONFIG_NAME = "story_tokenizer.json"


def image_token(index: int) -> str:
    """Name of the token for image query `index`, as the official `IMG_TOKEN='<img_{:05d}>'`."""
    return f"<img_{index:05d}>"


class TokenizerCalls:
    """What generation and layouts call on a story tokenizer, around its `tokenizers.Tokenizer` (`self.tokenizer`);
    shared by this BPE tokenizer and Llama-2's (`labkit.data.llama_tokenizer`)."""

    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it stay whole (one id each)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens


class StoryTokenizer(TokenizerCalls):
    """A `tokenizers.Tokenizer` plus the ids of the SEED-Story special tokens."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        ids = {name: tokenizer.token_to_id(name) for name in (BOS, EOS, PAD, UNK, BOI, EOI, INST)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise LabError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids[BOS], ids[EOS], ids[PAD], ids[UNK]
        self.boi_id, self.eoi_id, self.inst_id = ids[BOI], ids[EOI], ids[INST]
        self.image_token_ids = [tokenizer.token_to_id(image_token(i)) for i in range(num_image_tokens)]
        if None in self.image_token_ids:
            raise LabError(f"tokenizer lacks some of the {num_image_tokens} image query tokens")

    @classmethod
    def train(cls, captions: Iterable[str], merges: int = 1024, num_image_tokens: int = 64) -> "StoryTokenizer":
        """Train byte-level BPE on `captions`: the 256 bytes, the special tokens, and up to `merges` learned tokens."""
        if merges < 0:
            raise LabError(f"parameter merges: must be >= 0 (got {merges})")
        if num_image_tokens < 1:
            raise LabError(f"parameter num_image_tokens: must be at least 1 (got {num_image_tokens})")
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        specials = [BOS, EOS, PAD, UNK, BOI, EOI, INST] + [image_token(i) for i in range(num_image_tokens)]
        trainer = trainers.BpeTrainer(
            vocab_size=256 + len(specials) + merges,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(list(captions), trainer=trainer)
        return cls(tokenizer, num_image_tokens)

    @property
    def inst_ids(self) -> list[int]:
        """`[INST]`'s ids: one special token here (several SentencePiece pieces in Llama-2's tokenizer)."""
        return [self.inst_id]

    def save_pretrained(self, folder: Path | str) -> None:
        folder = Path(folder)
        write_text(folder / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        write_text(folder / CONFIG_NAME, json.dumps({"num_image_tokens": self.num_image_tokens}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: Path | str) -> "StoryTokenizer":
        folder = Path(folder)
        for name in ("tokenizer.json", CONFIG_NAME):
            if not (folder / name).is_file():
                raise LabError(
                    f"{folder / name}: not found (a story tokenizer folder holds tokenizer.json and {CONFIG_NAME}; "
                    "`labkit data make` writes one)"
                )
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), int(config["num_image_tokens"]))
