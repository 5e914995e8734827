"""The T5 tokenizer as PixArt's pipeline calls it: SentencePiece-Unigram ids with the end-of-sequence token,
truncated to the model's caption length and padded to exactly that length, with a mask.

A tokenizer folder holds `tokenizer.json` (the Hugging Face `tokenizers` format, what `T5TokenizerFast.save_pretrained`
writes), read with `tokenizers` (pad token from `tokenizer_config.json` / `special_tokens_map.json`, "<pad>"
otherwise), or only the SentencePiece `spiece.model` (as PixArt's released `tokenizer/` folders), read with
`sentencepiece`; both libraries are in the `text` extra. Either way the ids and mask equal transformers'
`T5TokenizerFast(prompts, padding="max_length", max_length=L, truncation=True)` (tests/test_pixart_sample.py).
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


def _hf_tokenizer(path: str, folder: str, max_length: int):
    """tokenizer.json through `tokenizers` → encode(prompts) → [(ids, mask, truncated)]."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"cannot read the tokenizer {path}: {e}") from None
    pad = _special(folder, "pad_token", "<pad>")
    if tok.token_to_id(pad) is None:
        raise TokenizerError(f"the tokenizer {path} has no pad token {pad!r}")
    # what transformers sets before each call with padding="max_length", truncation=True: the first L − 1 tokens
    # and the end-of-sequence token its post-processor appends, padded on the right
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=tok.token_to_id(pad), pad_token=pad)
    return lambda prompts: [(e.ids, e.attention_mask, bool(e.overflowing)) for e in tok.encode_batch(prompts)]


def _sentencepiece(path: str, folder: str, max_length: int):
    """spiece.model through `sentencepiece`, with T5's end-of-sequence token appended after truncation to L − 1
    pieces. Literal special-token text in a prompt ("</s>") stays text here (transformers splits it out)."""
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"cannot read the SentencePiece model {path}: {e}") from None
    eos, pad = sp.eos_id(), sp.pad_id()
    if eos < 0 or pad < 0:
        raise TokenizerError(f"the SentencePiece model {path} has no end-of-sequence or pad piece (T5's has both)")

    def encode(prompts):
        out = []
        for ids in sp.encode(list(prompts)):
            kept = ids[:max_length - 1] + [eos]
            out.append((kept + [pad] * (max_length - len(kept)), [1] * len(kept) + [0] * (max_length - len(kept)),
                        len(ids) > max_length - 1))
        return out
    return encode


# tried in order: the first file the tokenizer folder holds → (its library, the reader)
BACKENDS = (("tokenizer.json", "tokenizers", _hf_tokenizer), ("spiece.model", "sentencepiece", _sentencepiece))


class T5Tokenizer:
    """prompts → (ids (P, L) int32, mask (P, L) int32, truncated: indices of the prompts cut to L tokens)."""

    def __init__(self, folder: str, max_length: int):
        import importlib.util
        if max_length < 2:
            raise TokenizerError(f"a caption length of {max_length} leaves no room for a token and T5's </s>")
        self.max_length = int(max_length)
        for name, library, reader in BACKENDS:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                if importlib.util.find_spec(library) is None:
                    raise TokenizerError(f"reading {path} needs the `{library}` package: pip install -e '.[text]'")
                self._encode = reader(path, folder, self.max_length)
                return
        raise TokenizerError(f"the tokenizer folder {folder!r} holds neither tokenizer.json nor spiece.model: pass "
                             "the folder of a T5 tokenizer (e.g. PixArt-XL-2-512x512/tokenizer) as "
                             "--config.text.tokenizer_path")

    def __call__(self, prompts) -> tuple[np.ndarray, np.ndarray, list[int]]:
        rows = self._encode(list(prompts))
        ids = np.asarray([r[0] for r in rows], np.int32).reshape(len(rows), self.max_length)
        mask = np.asarray([r[1] for r in rows], np.int32).reshape(ids.shape)
        return ids, mask, [i for i, r in enumerate(rows) if r[2]]
