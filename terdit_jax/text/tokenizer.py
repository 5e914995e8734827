"""The T5 tokenizer as PixArt's pipeline calls it: SentencePiece-Unigram ids with the end-of-sequence token,
truncated to the model's caption length and padded to exactly that length, with a mask.

It reads the released `tokenizer.json` (the Hugging Face `tokenizers` format, e.g. google/t5-v1_1-xxl's or any
folder `T5TokenizerFast.save_pretrained` wrote) with the `tokenizers` library (the `text` extra), and the pad token
from `tokenizer_config.json` / `special_tokens_map.json` beside it ("<pad>" otherwise). Equal to transformers'
`T5TokenizerFast(prompts, padding="max_length", max_length=L, truncation=True)`, ids and mask
(tests/test_pixart_sample.py).
"""
from __future__ import annotations

import json
import os

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read; the message says what to do."""


def _special(folder: str, name: str, default: str) -> str:
    """A special token's text from tokenizer_config.json or special_tokens_map.json (a str or {"content": str})."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(name)
            if value:
                return value["content"] if isinstance(value, dict) else str(value)
    return default


class T5Tokenizer:
    """prompts → (ids (P, L) int32, mask (P, L) int32, truncated: indices of the prompts cut to L tokens)."""

    def __init__(self, folder: str, max_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("the T5 tokenizer needs the `tokenizers` package: pip install -e '.[text]'") from None
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            hint = (" (it holds only the SentencePiece spiece.model: write tokenizer.json beside it once, with "
                    "transformers: python -c \"from transformers import T5TokenizerFast as T; "
                    f"T.from_pretrained('{folder}').save_pretrained('{folder}')\")"
                    if os.path.isfile(os.path.join(folder, "spiece.model")) else "")
            raise TokenizerError(f"no tokenizer.json in the tokenizer folder {folder!r}{hint}; pass the folder of a "
                                 "T5 tokenizer as --config.text.tokenizer_path")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"cannot read the tokenizer {path}: {e}") from None
        pad = _special(folder, "pad_token", "<pad>")
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise TokenizerError(f"the tokenizer {path} has no pad token {pad!r}")
        self.max_length = int(max_length)
        # what transformers sets before each call with padding="max_length", truncation=True: keep the first L − 1
        # tokens and the end-of-sequence token the post-processor appends, pad on the right
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad)

    def __call__(self, prompts) -> tuple[np.ndarray, np.ndarray, list[int]]:
        encodings = self.tokenizer.encode_batch(list(prompts))
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(encodings), self.max_length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
        return ids, mask, [i for i, e in enumerate(encodings) if e.overflowing]
