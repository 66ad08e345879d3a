"""Llama-2's tokenizer with SEED-Story's image tokens, for the released weights (the `paper` preset).

The official code reads `pretrained/cvlm_llama2_tokenizer` (`configs/tokenizer/clm_llama_tokenizer.yaml`): Llama-2's
32000 SentencePiece pieces plus 66 added tokens, `<img>`, `</img>` and `<img_00000>`..`<img_00063>`, whose ids
(32000..32065) are the rows of the released agent's resized embedding (`vocab_size: 32066`,
`configs/clm_models/llama2chat7b_lora.yaml`). The lab reads the same thing with `tokenizers`, without transformers'
slow SentencePiece tokenizer: the base from `Llama-2-7b-hf/tokenizer.json` (the Hugging Face repo ships it) and the
66 tokens with their ids from the release's `cvlm_llama2_tokenizer/added_tokens.json`, so the ids are read, not
guessed.

`LlamaStoryTokenizer` answers to the same names as the lab's `StoryTokenizer` (`bos_id`, `boi_id`,
`image_token_ids`, `inst_ids`, `encode`, `decode`, ...), so generation runs unchanged. One difference: `[INST]`,
the official segment separator, is plain text here (`inst_ids` holds its SentencePiece pieces), as in the official
code. Llama-2 has no padding token; `<unk>` stands in (only batches of several stories pad).

`llama_format_tokenizer` builds a small tokenizer in Llama-2's `tokenizer.json` format (byte-fallback BPE on
`▁`-joined words), for the reduced official layouts of `labkit.models.official_layout`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from labkit.core.errors import LabError
from labkit.data.text_tokenizer import BOI, BOS, EOI, EOS, INST, UNK, TokenizerCalls, image_token

SPACE = "\u2581"  # SentencePiece's word marker


class LlamaStoryTokenizer(TokenizerCalls):
    """Llama-2's `tokenizers.Tokenizer` plus the ids of SEED-Story's tokens, `StoryTokenizer`'s interface."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        ids = {name: tokenizer.token_to_id(name) for name in (BOS, EOS, UNK, BOI, EOI)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise LabError(f"tokenizer lacks the tokens {missing}")
        self.bos_id, self.eos_id, self.unk_id = ids[BOS], ids[EOS], ids[UNK]
        self.pad_id = self.unk_id  # Llama-2 has no padding token
        self.boi_id, self.eoi_id = ids[BOI], ids[EOI]
        self.image_token_ids = [tokenizer.token_to_id(image_token(i)) for i in range(num_image_tokens)]
        if None in self.image_token_ids:
            raise LabError(f"tokenizer lacks some of the {num_image_tokens} image query tokens")
        self.inst_ids = self.encode(INST)  # plain text in the official code: several pieces

    @classmethod
    def from_files(cls, tokenizer_json: Path | str, added_tokens_json: Path | str) -> "LlamaStoryTokenizer":
        """Llama-2's `tokenizer.json` + the release's `added_tokens.json` (token -> id), checked: the added tokens
        must be `<img>`, `</img>` and `<img_00000>`.. with ids right after Llama-2's vocabulary."""
        tokenizer_json, added_tokens_json = Path(tokenizer_json), Path(added_tokens_json)
        for path in (tokenizer_json, added_tokens_json):
            if not path.is_file():
                raise LabError(f"{path}: not found")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # a foreign or damaged file: say which one
            raise LabError(f"{tokenizer_json}: not a tokenizers JSON file ({error})") from None
        try:
            added = json.loads(added_tokens_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise LabError(f"{added_tokens_json}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
            raise LabError(f"{added_tokens_json}: expected an object mapping each added token to its id")
        queries = len(added) - 2
        expected = {BOI, EOI, *(image_token(i) for i in range(queries))}
        if queries < 1 or set(added) != expected:
            unknown = sorted(set(added) - expected)[:4]
            raise LabError(
                f"{added_tokens_json}: expected <img>, </img> and <img_00000>..<img_{queries - 1:05d}>"
                + (f"; unexpected {unknown}" if unknown else "; some are missing")
            )
        base = tokenizer.get_vocab_size(with_added_tokens=True)
        order = sorted(added, key=added.get)
        if [added[token] for token in order] != list(range(base, base + len(order))):
            raise LabError(
                f"{added_tokens_json}: the added ids must follow {tokenizer_json.name}'s {base} tokens "
                f"({base}..{base + len(order) - 1}); got {min(added.values())}..{max(added.values())}"
            )
        # in id order, so each lands on the id the released embedding rows were trained for
        tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in order])
        placed = [tokenizer.token_to_id(token) for token in order]
        if placed != [added[token] for token in order]:  # a token Llama-2 already had would shift the rest
            raise LabError(
                f"{added_tokens_json}: {tokenizer_json.name} gives the added tokens other ids ({placed[:3]}..)"
            )
        return cls(tokenizer, queries)


def added_tokens(base_vocab: int, num_image_tokens: int) -> dict[str, int]:
    """SEED-Story's added tokens and their ids in the release's order: the image tokens first, then `<img>`,
    `</img>` (the SEED family adds them so; the release's `added_tokens.json` is what the loader reads)."""
    names = [image_token(i) for i in range(num_image_tokens)] + [BOI, EOI]
    return {name: base_vocab + k for k, name in enumerate(names)}


def llama_format_tokenizer(texts: Iterable[str], merges: int = 200) -> Tokenizer:
    """A small tokenizer in Llama-2's `tokenizer.json` format: `<unk>`, `<s>`, `</s>` (ids 0-2), the 256 byte
    pieces `<0x00>`.. (byte fallback), then BPE pieces learned on `texts`; the same normalizer (prepend `▁`,
    spaces to `▁`), decoder and `<s>` template as Llama-2's."""
    learner = Tokenizer(models.BPE(unk_token=UNK))
    learner.normalizer = _normalizer()
    learner.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}[^{SPACE}]*"), behavior="isolated")
    learner.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=64 + merges, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {UNK: 0, BOS: 1, EOS: 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = _normalizer()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (UNK, BOS, EOS)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return tokenizer


def _normalizer():
    return normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
