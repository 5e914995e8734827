"""Sampling the pixart family from prompts: the T5 tokenizer against transformers' T5TokenizerFast, the T5 folder
loader and prompt encoding against transformers' T5EncoderModel, the caption K/V prepared once per prompt batch
(equal output, no caption matmuls left in the step), and the command line with its bad-input errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import diffusers_pixart
from terdit_jax.config import ConfigError, base_config, finalize
from terdit_jax.configs import pixart_alpha_512
from terdit_jax.diffusion.samplers import cfg_model_fn
from terdit_jax.model_fn import bind, init_model
from terdit_jax.models.pixart import Caption
from terdit_jax.text import captions
from terdit_jax.text.prompts import PromptError, encode_prompts, preprocess, read_prompts
from terdit_jax.text.tokenizer import T5Tokenizer, TokenizerError

D, L, H, CC, N, LATENT = 32, 2, 2, 16, 8, 4
SENTENCES = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon",
             "a watercolor painting of a lighthouse at dawn", "two dogs playing in the snow, high detail"]
PROMPTS = ["A Cat", "two  dogs, a red sofa and a lighthouse at dawn in watercolor, high detail!", ""]


def write_tokenizer(folder) -> str:
    """A tiny T5-style tokenizer.json (SentencePiece Unigram, '▁' metaspace, '</s>' appended) trained offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Strip(left=False, right=True),
                                           normalizers.Replace(Regex(" {2,}"), "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(SENTENCES * 5, trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>",
                                                                   special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 0}, f)
    return str(folder)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A released-pipeline layout: text_encoder/ (a random tiny T5 v1.1 saved by transformers as safetensors)
    beside tokenizer/."""
    torch = pytest.importorskip("torch")
    from transformers import T5Config, T5EncoderModel
    root = tmp_path_factory.mktemp("pixart")
    write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    ref = T5EncoderModel(T5Config(vocab_size=64, d_model=CC, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)).eval()
    ref.save_pretrained(root / "text_encoder", safe_serialization=True)
    return root, ref


def text_cfg(root):
    return ml_collections.ConfigDict({"encoder_path": str(root / "text_encoder"), "tokenizer_path": "",
                                      "batch_size": 2})


def tiny_config(**sample):
    c = pixart_alpha_512.get_config()
    c.model.update(name="custom", dim=D, n_layers=L, n_heads=H, patch_size=2, caption_channels=CC,
                   caption_len=N, dtype="float32", in_channels=3, linear="fp")
    c.data.update(latent=False, image_size=LATENT)
    c.sample.update({"num_steps": 2, "batch_size": 4, **sample})  # the config's PixArt sampler, cfg 4.5, all ε
    return finalize(c)


def randomised(params, scale=0.2, seed=1):
    """Every parameter random (PixArt zero-initialises some layers), so every path shows in the output."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), params)


def _caption(rng, b=2):
    mask = (np.arange(N)[None] < np.array([3, N, 1, 5])[:b, None]).astype(np.int32)
    return rng.standard_normal((b, N, CC)).astype(np.float32), mask


# ------------------------------------------------------------------------------------------------- tokenizer ---

def test_tokenizer_equals_t5_tokenizer_fast_with_truncation_and_eos(tmp_path):
    from transformers import T5TokenizerFast
    folder = write_tokenizer(tmp_path / "tok")
    ref = T5TokenizerFast.from_pretrained(folder)
    want = ref(PROMPTS, padding="max_length", max_length=N, truncation=True)
    ids, mask, truncated = T5Tokenizer(folder, N)(PROMPTS)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert ids.shape == (3, N) and ids.dtype == np.int32
    assert ids[1, -1] == ref.eos_token_id and ids[2, 0] == ref.eos_token_id and mask[2].sum() == 1
    full = [len(x) for x in ref(PROMPTS)["input_ids"]]
    assert truncated == [i for i, n in enumerate(full) if n > N] and 1 in truncated and 2 not in truncated


def test_sentencepiece_model_folder_equals_t5_tokenizer_fast(tmp_path):
    """PixArt's released tokenizer/ holds only spiece.model: read with sentencepiece, as transformers converts it."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5TokenizerFast
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 5), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   minloglevel=2)
    prompts = [*PROMPTS, " café  ½ x ", "a\tb\nc"]
    want = T5TokenizerFast.from_pretrained(str(tmp_path), extra_ids=0)(prompts, padding="max_length", max_length=N,
                                                                       truncation=True)
    ids, mask, truncated = T5Tokenizer(str(tmp_path), N)(prompts)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert 1 in truncated and 2 not in truncated
    os.remove(tmp_path / "spiece.model")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor spiece.model"):
        T5Tokenizer(str(tmp_path), N)


# ------------------------------------------------------------------------------------------- prompt encoding ---

def test_encode_prompts_equals_transformers_tokenizer_and_t5(pipeline_dir):
    import torch
    from transformers import T5TokenizerFast
    root, ref = pipeline_dir
    notes = []
    got = encode_prompts(PROMPTS[:2], text_cfg(root), N, log=notes.append)
    tok = T5TokenizerFast.from_pretrained(str(root / "tokenizer"))
    batch = tok([preprocess(p) for p in [*PROMPTS[:2], ""]], padding="max_length", max_length=N, truncation=True,
                return_tensors="pt")
    with torch.no_grad():
        want = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.numpy()
    mask = batch.attention_mask.numpy()
    np.testing.assert_array_equal(got.mask, mask[:2])
    np.testing.assert_array_equal(got.null_mask, mask[2])
    hidden = np.concatenate([got.caption, got.null_caption[None]])  # padded positions included
    err = np.abs(hidden - want).max() / np.abs(want).max()
    assert err <= 1e-5, err
    assert got.prompts == tuple(PROMPTS[:2])  # the file keeps the prompts as written
    assert len(notes) == 1 and notes[0].startswith("note: 1 prompt(s) exceed the 8-token limit") and "#2" in notes[0]


def test_read_prompts_rejects_empty_and_binary_files(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeffa cat\n\n  a dog  \n", encoding="utf-8")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(PromptError, match="has no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        read_prompts(str(tmp_path / "latin1.txt"))
    (tmp_path / "bin.txt").write_bytes(b"a\x00b\x00")
    with pytest.raises(PromptError, match="not UTF-8"):
        read_prompts(str(tmp_path / "bin.txt"))


# ------------------------------------------------------------------------------------------- prepared caption ---

def _dots_over_caption(jaxpr, n: int, rows: int) -> int:
    """dot_generals of the caption tokens (..., n, K), or flattened to (rows, K) (`models.ternary.token_matmul`:
    rows = batch · n; the image tokens here are fewer than n per example), with a weight (K, ·)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [v.aval.shape for v in eqn.invars]
            lhs, rhs = shapes
            if len(rhs) == 2 and (len(lhs) >= 3 and lhs[-2] == n or len(lhs) == 2 and lhs[0] == rows):
                count += 1
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                count += _dots_over_caption(inner, n, rows)
    return count


def test_prepared_caption_equals_the_raw_caption_and_leaves_no_caption_matmul_in_the_step():
    cfg = tiny_config()
    apply, params = init_model(cfg.model, 0)
    params = randomised(params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, LATENT, LATENT, 3)).astype(np.float32)
    t = np.array([10, 900])
    y = _caption(rng)
    prepare = jax.jit(lambda p, y: nnx.merge(apply.graphdef, p).prepare(y))
    prepared = prepare(params, y)
    assert isinstance(prepared, Caption) and len(prepared.kv) == L
    assert nnx.merge(apply.graphdef, params).prepare(prepared) is prepared
    null = tuple(a[0] for a in _caption(rng, 1))
    null_prepared = jax.tree.map(lambda a: a[0], prepare(params, tuple(a[None] for a in null)))
    raw_fn = cfg_model_fn(bind(apply, params), 4.5, null, None)
    prep_fn = cfg_model_fn(bind(apply, params), 4.5, null_prepared, None)
    call = jax.jit(lambda fn, x, t, y: fn(x, t, y))
    want = np.asarray(call(raw_fn, x, t, y))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(call(prep_fn, x, t, prepared)), want, rtol=1e-6, atol=1e-6)
    # the caption projection (2 matmuls) and every block's attn2 to_k/to_v (2 each) run once per prompt batch
    rows = 2 * len(x) * N  # the conditional and the null half
    assert (LATENT // 2) ** 2 < N
    assert _dots_over_caption(jax.make_jaxpr(raw_fn)(x, t, y).jaxpr, N, rows) == 2 + 2 * L
    assert _dots_over_caption(jax.make_jaxpr(prep_fn)(x, t, prepared).jaxpr, N, rows) == 0


def test_prepared_caption_with_quantized_kv_and_a_time_grouped_caption_path():
    rng = np.random.default_rng(2)
    x, t, y = rng.standard_normal((2, LATENT, LATENT, 3)).astype(np.float32), np.array([3, 700]), _caption(rng)
    kv_rules = ({"path": r"transformer_blocks\.\d+\.attn2\.to_[kv]\.weight", "kind": "uniform", "bits": 4},
                {"path": r"transformer_blocks\.\d+\.attn2\.to_[kv]\.input", "kind": "uniform", "bits": 8,
                 "granularity": "token", "dynamic": True},
                {"path": r"transformer_blocks\.\d+\.attn2\.[kv]", "kind": "uniform", "bits": 4, "dynamic": True})
    time_grouped = {"path": r"transformer_blocks\.1\.attn2\.to_v\.output", "kind": "uniform", "bits": 8,
                    "time_groups": 2}
    fp_apply, params = init_model(tiny_config().model, 0)
    params = randomised(params, seed=3)
    fp = np.asarray(jax.jit(fp_apply)(params, x, t, y))
    for rules, cached in ((kv_rules, True), ((*kv_rules[:1], time_grouped), False)):
        cfg = tiny_config()
        cfg.model.sites = rules
        apply, state = init_model(cfg.model, 0)
        state = nnx.merge_state(state, params)  # the same weights, plus the quantizers' state
        prepared = jax.jit(lambda s, y: nnx.merge(apply.graphdef, s).prepare(y))(state, y)
        assert isinstance(prepared, Caption) == cached
        call = jax.jit(apply)
        want = np.asarray(call(state, x, t, y))
        assert np.abs(want - fp).max() > 1e-4  # the sites act
        np.testing.assert_allclose(np.asarray(call(state, x, t, prepared)), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- command line ---

def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "terdit_jax.main", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def tiny_flags(workdir):
    return ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "pixart_alpha_512.py"),
            "--workdir", str(workdir), "--config.model.name=custom", f"--config.model.dim={D}",
            f"--config.model.n_layers={L}", f"--config.model.n_heads={H}", f"--config.model.caption_channels={CC}",
            f"--config.model.caption_len={N}", "--config.model.in_channels=3", "--config.data.latent=False",
            f"--config.data.image_size={LATENT}", "--config.sample.num_steps=2", "--config.sample.per_class=2"]


@pytest.fixture(scope="module")
def sample_workdir(tmp_path_factory):
    from terdit_jax.checkpoint import Checkpoints
    workdir = tmp_path_factory.mktemp("pixart_run")
    cfg = tiny_config()
    _, params = init_model(cfg.model, 0)
    ckpt = Checkpoints(str(workdir / "checkpoints"), async_save=False)
    ckpt.save_weights(0, randomised(params, scale=0.1), cfg.model, {"kind": "test"})
    ckpt.close()
    return workdir


@pytest.mark.slow
def test_sample_mode_from_a_prompt_file_and_from_prompt_embeds(sample_workdir, pipeline_dir, tmp_path, monkeypatch):
    from terdit_jax.sample import run_sample_mode
    root, _ = pipeline_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n", encoding="utf-8")
    config = tiny_config(prompts=str(prompts), per_class=2)
    config.text.encoder_path = str(root / "text_encoder")
    lines = []
    npz = run_sample_mode(config, str(sample_workdir), log=lines.append)["npz"]
    assert sum(line.startswith("note:") for line in lines) == 1 and "truncated" in " ".join(lines)
    assert npz == os.path.join(sample_workdir, "samples", "sample_0000000_dpm++2_cfg4.5.npz")
    with np.load(npz) as z:
        images = z["arr_0"]
        assert images.shape == (4, LATENT, LATENT, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(z["arr_1"], [0, 0, 1, 1])
        assert list(z["prompts"]) == PROMPTS[:2]
    assert not np.array_equal(images[0], images[2])  # the prompt matters
    # the same prompts as precomputed embeddings (what --mode encode_prompts writes) give the same images
    embeds = tmp_path / "captions.npz"
    captions.write(str(embeds), encode_prompts(PROMPTS[:2], text_cfg(root), N, log=lambda *_: None))
    os.remove(npz)
    assert run_sample_mode(tiny_config(prompt_embeds=str(embeds), per_class=2), str(sample_workdir),
                           log=lambda *_: None)["npz"] == npz
    with np.load(npz) as z:
        np.testing.assert_array_equal(z["arr_0"], images)
    # --mode eval cycles through the prompts (labels = prompt indices), batch by batch
    from terdit_jax.eval import evaluate, run as eval_run
    monkeypatch.setattr(eval_run, "reference_for", lambda *a, **k: "reference.npz")
    monkeypatch.setattr(evaluate, "evaluate", lambda npz, ref, **kw: {"fid": 0.0})
    config = tiny_config(prompt_embeds=str(embeds), per_class=1, batch_size=2)
    config.eval.num_samples = 3
    report = eval_run.run_eval_mode(config, str(sample_workdir), log=lambda *_: None)
    with np.load(report["samples"]) as z:
        np.testing.assert_array_equal(z["arr_1"], [0, 1, 0])
        assert not np.array_equal(z["arr_0"][0], z["arr_0"][1])
    assert json.load(open(report["report"]))["model"]["kind"] == "checkpoint"
    # through the command line, a wrong-width embeddings file: one error line, exit 2
    wrong = captions.read(str(embeds))
    captions.write(str(embeds), captions.make(wrong.prompts, wrong.caption[..., :-1], wrong.mask,
                                              wrong.null_caption[:, :-1], wrong.null_mask))
    r = cli(*tiny_flags(sample_workdir), "--mode", "sample", f"--config.sample.prompt_embeds={embeds}")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "width 15" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_prompt_input_raises_errors_that_main_reports(sample_workdir, pipeline_dir, tmp_path):
    """Each is one of the exception types main turns into an `error:` line and exit 2 (main.py's except)."""
    from terdit_jax.sample import run_sample_mode
    root, _ = pipeline_dir
    quiet = dict(log=lambda *_: None)
    reported = (ConfigError, captions.CaptionError, PromptError, TokenizerError, FileNotFoundError)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "p.txt").write_text("a cat\n")
    short = encode_prompts(["a cat"], text_cfg(root), N - 2, **quiet)
    captions.write(str(tmp_path / "short.npz"), short)
    cases = [(dict(prompts=str(tmp_path / "empty.txt")), {}, "has no prompts"),
             (dict(prompts=str(tmp_path / "bin.txt")), {}, "not UTF-8"),
             (dict(prompts=str(tmp_path / "p.txt")), {}, "no text-encoder folder ''"),
             (dict(prompts=str(tmp_path / "p.txt")), {"encoder_path": str(tmp_path / "nope")}, "huggingface-cli"),
             (dict(prompt_embeds=str(tmp_path / "short.npz")), {}, "have 6 tokens of width 16"),
             (dict(), {}, "--config.sample.prompts=FILE")]
    for sample, text, message in cases:
        cfg = tiny_config(**sample)
        cfg.text.update(text)
        with pytest.raises(reported, match=message):
            run_sample_mode(cfg, str(sample_workdir), **quiet)
    # --mode encode_prompts writes what sampling reads, and never replaces a file unasked
    from terdit_jax.sample import run_encode_prompts_mode
    cfg = tiny_config(prompts=str(tmp_path / "p.txt"))
    cfg.text.update(text_cfg(root))
    out = run_encode_prompts_mode(cfg, str(tmp_path / "w"), **quiet)
    assert out == str(tmp_path / "w" / "captions" / "p.npz")
    want = encode_prompts(["a cat"], text_cfg(root), N, **quiet)
    np.testing.assert_array_equal(captions.read(out).caption, want.caption)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_encode_prompts_mode(cfg, str(tmp_path / "w"), **quiet)
    c = base_config()  # a class-label family given prompts
    c.model.update(name="custom", dim=32, n_layers=1, n_heads=2, num_classes=10)
    c.data.update(latent=False, image_size=8)
    c.sample.prompts = str(tmp_path / "p.txt")
    from terdit_jax.sample import sample_conditions
    with pytest.raises(ConfigError, match="class-conditional"):
        sample_conditions(finalize(c))
    with pytest.raises(ConfigError, match="set one of them"):
        tiny_config(prompts="a.txt", prompt_embeds="b.npz")


def test_prompts_to_latents_equal_diffusers_pixart_alpha_pipeline(pipeline_dir, tmp_path):
    """The whole chain (prompt file → tokenizer → T5 → captions, the empty prompt for CFG 4.5, DPM-Solver++(2M),
    prepared caption K/V) against diffusers' PixArtAlphaPipeline with the same tiny random transformer and T5."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from transformers import T5TokenizerFast
    from terdit_jax.convert.pixart_diffusers import load_diffusers
    from terdit_jax.diffusion.schedule import linear_betas
    from terdit_jax.sample import generate, sample_conditions
    root, t5 = pipeline_dir
    size = 8
    ref = diffusers_pixart(sample_size=size, dim=D, heads=H, layers=L, caption_channels=CC)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=linear_betas(1000),
                                            solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    pipe = PixArtAlphaPipeline(tokenizer=T5TokenizerFast.from_pretrained(str(root / "tokenizer")), text_encoder=t5,
                               vae=None, transformer=ref, scheduler=scheduler)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]), encoding="utf-8")
    config = tiny_config(prompts=str(tmp_path / "p.txt"), num_steps=3)
    config.model.in_channels, config.data.image_size = 4, size
    config = finalize(config)
    config.text.update(text_cfg(root))
    apply, _ = init_model(config.model, 0)
    model = nnx.merge(apply.graphdef, init_model(config.model, 0)[1])
    load_diffusers(model, {k: v.numpy() for k, v in ref.state_dict().items()})
    params = nnx.state(model, nnx.Param)
    conds = sample_conditions(config, log=lambda *_: None)
    key = jax.random.key(0)
    x_T = jax.random.normal(jax.random.split(jax.random.fold_in(key, 0))[0], (2, size, size, 4))  # generate's noise
    got = []
    generate(apply, params, conds.y, config, key, null_y=conds.null_y, decode=lambda x: got.append(x) or x)
    with torch.no_grad():
        want = pipe(prompt=PROMPTS[:2], num_inference_steps=3, guidance_scale=4.5, height=8 * size, width=8 * size,
                    latents=torch.from_numpy(np.array(x_T)).permute(0, 3, 1, 2), output_type="latent",
                    clean_caption=False, use_resolution_binning=False, max_sequence_length=N).images
    want = want.permute(0, 2, 3, 1).numpy()
    err = np.abs(np.asarray(got[0]) - want).max() / np.abs(want).max()
    print("pipeline rel err", err)
    assert err <= 1e-4, err


def test_caption_cache_benchmark_counts_what_the_cache_skips():
    """benchmarks/pixart_caption_cache.py: the FLOPs and parameter bytes it reports for a tiny config, against
    closed forms (caption projection Cc·D + D², each block's to_k/to_v 2·D², biases included for the bytes)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import pixart_caption_cache as bench
    out = bench.count(tiny_config().model, batch=1)
    skipped = 2 * 2 * N * (CC * D + D * D + L * 2 * D * D)  # CFG doubles the batch; 2 FLOPs per multiply-add
    assert round((out["step_matmul_gflop_raw"] - out["step_matmul_gflop_prepared"]) * 1e9) == skipped
    cached = 4 * (CC * D + D + D * D + D + L * 2 * (D * D + D))
    assert out["param_bytes_raw"] * (1 - out["param_bytes_prepared_over_raw"]) == pytest.approx(cached)


def test_a_block_takes_a_plain_caption_pair_or_a_prepared_one():
    """Block-wise code (PTQ calibration) hands a block Context(t, None, (tokens, mask)); a sampler's prepared
    caption reaches it through block_context: the block's output is the same."""
    from terdit_jax.models.backbone import Context
    cfg = tiny_config()
    apply, params = init_model(cfg.model, 0)
    model = nnx.merge(apply.graphdef, randomised(params))
    rng = np.random.default_rng(4)
    tokens, c = rng.standard_normal((2, 4, D)).astype(np.float32), rng.standard_normal((2, 7 * D)).astype(np.float32)
    t, y = np.array([1, 2]), _caption(rng)
    plain = model.transformer_blocks[1](tokens, c, Context(t, None, tuple(model.caption(y, t))))
    ctx = model.block_context(model.attach(Context(t, None), model.prepare(y)), 1)
    np.testing.assert_allclose(np.asarray(model.transformer_blocks[1](tokens, c, ctx)), np.asarray(plain),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block_context"):  # all blocks' K/V handed to one block
        model.transformer_blocks[1](tokens, c, model.attach(Context(t, None), model.prepare(y)))
