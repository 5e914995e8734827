"""Prompts → caption embeddings (`text.captions.Captions`), as diffusers' PixArtAlphaPipeline encodes them: each
prompt lower-cased and stripped (the pipeline's `clean_caption=False` path; its BeautifulSoup/ftfy cleaning is not
reproduced), tokenized to the model's caption length with a mask (`text.tokenizer`), and run through the T5
encoder (`text.t5`) loaded from a released folder (config.json + *.safetensors, e.g. PixArt-XL-2-512x512's
`text_encoder/`); the empty prompt "" goes through the same steps for classifier-free guidance.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np

from terdit_jax.text import captions as captions_lib
from terdit_jax.text.t5 import T5Config, encode, from_hf
from terdit_jax.text.tokenizer import BACKENDS, T5Tokenizer


class PromptError(ValueError):
    """A prompt file or a text-encoder folder that cannot be used; the message says what to do."""


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 text file (surrounding whitespace dropped)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no prompt file {path!r}: pass a text file with one prompt per line") from None
    except OSError as e:
        raise PromptError(f"cannot read the prompt file {path!r} ({e.strerror})") from None
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(f"the prompt file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}): pass a "
                          "text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"the prompt file {path!r} has no prompts: write one prompt per line")
    return prompts


def preprocess(prompt: str) -> str:
    """diffusers' PixArt `_text_preprocessing(text, clean_caption=False)`."""
    return prompt.lower().strip()


class _Shards(dict):
    """name → array, read from the folder's safetensors files on first use (T5-XXL's 19 GB stay on disk until the
    importer asks for a tensor; the tied `encoder.embed_tokens` copy is never read)."""

    def __init__(self, files: list[str]):
        try:
            from safetensors import safe_open
        except ImportError:
            raise PromptError("reading the T5 weights needs the `safetensors` package: pip install -e '.[text]'") \
                from None
        super().__init__()
        self._where = {}
        for file in files:
            with safe_open(file, "numpy") as f:
                self._where.update({k: file for k in f.keys()})

    def __missing__(self, name: str):
        if name not in self._where:
            raise KeyError(name)
        from safetensors import safe_open
        with safe_open(self._where[name], "numpy") as f:
            return f.get_tensor(name)


def load_t5(folder: str) -> tuple[dict, T5Config]:
    """The T5 v1.1 encoder of a Hugging Face folder (config.json + *.safetensors, sharded or not) → (params of
    `t5.encode`, its T5Config)."""
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"no text-encoder folder {folder!r}: download the T5 encoder once (e.g. "
                                "`huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512 --include "
                                "'text_encoder/*' 'tokenizer/*' --local-dir pixart/`) and pass "
                                "--config.text.encoder_path=pixart/text_encoder")
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not os.path.isfile(os.path.join(folder, "config.json")) or not files:
        raise PromptError(f"the text-encoder folder {folder!r} needs config.json and *.safetensors weights (a "
                          "transformers T5EncoderModel saved with safe_serialization)")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("feed_forward_proj") != "gated-gelu":  # transformers' default "relu" is the original T5's
        raise PromptError(f"{folder!r} is not a T5 v1.1 encoder (feed_forward_proj={hf.get('feed_forward_proj')!r}, "
                          "PixArt's is 'gated-gelu')")
    cfg = T5Config(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
                   num_layers=hf["num_layers"], num_heads=hf["num_heads"],
                   num_buckets=hf.get("relative_attention_num_buckets", 32),
                   max_distance=hf.get("relative_attention_max_distance", 128), eps=hf.get("layer_norm_epsilon", 1e-6))
    try:
        return from_hf(_Shards(files), cfg), cfg
    except KeyError as e:
        raise PromptError(f"the weights in {folder!r} lack {e} (expected a T5EncoderModel state dict)") from None


def tokenizer_folder(text_cfg) -> str:
    """`text.tokenizer_path`, or where a released pipeline keeps it: the encoder folder if it holds a tokenizer
    (tokenizer.json or spiece.model), else its sibling `tokenizer/` (diffusers' layout: text_encoder/ beside
    tokenizer/)."""
    if text_cfg.tokenizer_path:
        return text_cfg.tokenizer_path
    enc = os.path.normpath(text_cfg.encoder_path)
    held = any(os.path.isfile(os.path.join(enc, name)) for name, _, _ in BACKENDS)
    return enc if held else os.path.join(os.path.dirname(enc), "tokenizer")


def encode_prompts(prompts: list[str], text_cfg, caption_len: int, *, log=print) -> captions_lib.Captions:
    """prompts → Captions of `caption_len` tokens (and the empty prompt's), with the encoder and tokenizer that
    `text_cfg` (config.text) names. One `note:` line lists the prompts cut to the token limit."""
    params, cfg = load_t5(text_cfg.encoder_path)
    tokenizer = T5Tokenizer(tokenizer_folder(text_cfg), caption_len)
    ids, mask, truncated = tokenizer([preprocess(p) for p in [*prompts, ""]])
    truncated = [i for i in truncated if i < len(prompts)]
    if truncated:
        named = "; ".join(f"#{i + 1} {prompts[i][:40]!r}" for i in truncated[:5])
        log(f"note: {len(truncated)} prompt(s) exceed the {caption_len}-token limit and were truncated: {named}"
            + (" ..." if len(truncated) > 5 else ""))
    run = jax.jit(lambda p, i, m: encode(p, cfg, i, m))
    b = max(1, int(text_cfg.batch_size))
    out = []
    for lo in range(0, len(ids), b):  # the last batch padded to b rows: one compile
        n = min(b, len(ids) - lo)
        pad = lambda a: np.concatenate([a[lo:lo + n], np.repeat(a[lo + n - 1:lo + n], b - n, 0)])  # noqa: E731
        out.append(np.asarray(run(params, pad(ids), pad(mask)), np.float32)[:n])
    hidden = np.concatenate(out)  # padded positions kept as the encoder gives them (the mask hides them)
    return captions_lib.make(prompts, hidden[:-1], mask[:-1], hidden[-1], mask[-1])
