"""Stable-Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax NNX, NHWC.

The architecture follows diffusers' ``models/autoencoders/vae.py`` (Encoder, Decoder) and ``autoencoder_kl.py``
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"). Attribute names mirror the
diffusers state-dict keys, so ``convert.py`` is a short table of renames:
``downsamplers.0.conv`` -> ``downsample``, ``upsamplers.0.conv`` -> ``upsample``, ``attentions.0`` -> ``attention``,
``to_out.0`` -> ``to_out``.

Latents for a diffusion model are ``sample_latent(vae.encode(x), key) * config.scaling_factor``; decode with
``vae.decode(z / config.scaling_factor)``. ``encode``/``decode`` themselves apply no scaling, as in diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_EPS = 1e-6  # every GroupNorm in the diffusers VAE uses eps 1e-6
DECODE_SLICE = 1  # latents decoded at a time by default (benchmarks/vs_diffusers.py's vae row: time and peak memory)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL``; the defaults are stabilityai/sd-vae-ft-ema (83,653,863 parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 256
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad:
            raise ValueError(f"block_out_channels {self.block_out_channels} must be non-empty and each divisible by "
                             f"norm_num_groups={self.norm_num_groups}; offending: {bad}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "VAEConfig":
        """Builds a config from a diffusers ``config.json`` dict; rejects variants this port does not implement."""
        n = len(cfg.get("block_out_channels", cls.block_out_channels))
        checks = {
            "act_fn": (cfg.get("act_fn", "silu"), "silu"),
            "down_block_types": (list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * n)), ["DownEncoderBlock2D"] * n),
            "up_block_types": (list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * n)), ["UpDecoderBlock2D"] * n),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"VAE config field {name}={got!r} is not supported; this Flax port implements {want!r} "
                                 "(the Stable Diffusion AutoencoderKL).")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


def _conv(cin: int, cout: int, k: int, dtype, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
    """A torch-like Conv2d: symmetric padding k//2 unless given, float32 params, kernel HWIO."""
    p = k // 2 if padding is None else padding
    pad = ((p, p), (p, p)) if isinstance(p, int) else p
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _norm(ch: int, groups: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # use_fast_variance=False: E[x^2]-E[x]^2 loses precision on large activations; torch uses the two-pass form.
    return nnx.GroupNorm(ch, num_groups=groups, epsilon=_EPS, use_fast_variance=False, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv3x3 twice, plus a 1x1 shortcut if channels change."""

    def __init__(self, cin: int, cout: int, groups: int, dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, groups, dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, dtype, rngs)
        self.norm2 = _norm(cout, groups, dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, dtype, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N,H,W,cin) -> (N,H,W,cout)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout is 0 in the VAE
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nnx.Module):
    """The VAE's mid-block self-attention: GroupNorm, one head of width C over the H*W tokens, residual."""

    def __init__(self, ch: int, groups: int, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.group_norm = _norm(ch, groups, dtype, rngs)
        lin = lambda: nnx.Linear(ch, ch, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = lin(), lin(), lin(), lin()

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N,H,W,C) -> (N,H,W,C)."""
        n, hh, ww, c = x.shape
        t = self.group_norm(x).reshape(n, hh * ww, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # Logits and softmax in float32 (diffusers sets upcast_softmax=True for this block).
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("nqk,nkc->nqc", probs, v))
        return x + out.reshape(n, hh, ww, c)


class MidBlock(nnx.Module):
    """diffusers UNetMidBlock2D for the VAE: resnet, (attention), resnet at constant width."""

    def __init__(self, ch: int, groups: int, add_attention: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(ch, ch, groups, dtype, rngs) for _ in range(2)])
        self.attention = Attention(ch, groups, dtype, rngs) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """diffusers DownEncoderBlock2D: ``num_layers`` resnets, then an optional stride-2 conv."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype, rngs)
                                 for i in range(num_layers)])
        # diffusers Downsample2D(padding=0) pads only bottom/right by one before a VALID stride-2 conv.
        self.downsample = (_conv(cout, cout, 3, dtype, rngs, stride=2, padding=((0, 1), (0, 1)))
                           if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """diffusers UpDecoderBlock2D: ``num_layers`` resnets, then optional nearest x2 upsample + conv3x3."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype, rngs)
                                 for i in range(num_layers)])
        self.upsample = _conv(cout, cout, 3, dtype, rngs) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.upsample is None else upsample_conv(self.upsample, x)


# Nearest ×2 upsampling then a 3×3 conv, per output phase a (row parity): output row 2i+a sees input rows
# i−1+a and i+a, the 3 kernel rows folded onto them as [W0, W1+W2] (a=0) or [W0+W1, W2] (a=1); columns alike.
_PHASE_TAPS = jnp.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], jnp.float32)  # (a, tap, kernel row)


def upsample_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """conv(nearest_upsample_2x(x)) for a 3×3 "same" conv, computed on x itself ("sub-pixel" form): one 2×2 conv
    of the once-padded x with the four phases' folded kernels stacked on the output axis, then interleaved.
    16 taps per input pixel instead of 36 per input pixel: the VAE decoder's three upsampling convs, half its
    FLOPs, run 2.25× fewer (they made the decode slower than diffusers', benchmarks/vs_diffusers.py).
    x (N,H,W,Cin) -> (N,2H,2W,Cout)."""
    n, h, w, _ = x.shape
    dtype = conv.dtype or x.dtype
    kernel = jnp.einsum("aih,bjw,hwco->ijcabo", _PHASE_TAPS, _PHASE_TAPS, conv.kernel[...].astype(jnp.float32))
    kernel = kernel.reshape(2, 2, kernel.shape[2], -1).astype(dtype)  # (2, 2, Cin, 4·Cout): (a, b, o) on the last
    z = jax.lax.conv_general_dilated(jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0))), kernel, (1, 1),
                                     "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (N, H+1, W+1, 4·Cout)
    z = z.reshape(n, h + 1, w + 1, 2, 2, -1)
    y = jnp.stack([jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in (0, 1)], 3) for a in (0, 1)], 2)
    y = y.reshape(n, 2 * h, 2 * w, -1)  # (n, i, a, j, b, c) → rows 2i+a, columns 2j+b
    return y + conv.bias[...].astype(dtype) if conv.bias is not None else y


class Encoder(nnx.Module):
    """Image (N,H,W,in) -> moments (N,H/f,W/f,2*latent) before quant_conv, f = config.downsample_factor."""

    def __init__(self, cfg: VAEConfig, dtype, rngs: nnx.Rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, boc[0], 3, dtype, rngs)
        self.down_blocks = nnx.List([
            DownBlock(boc[max(i - 1, 0)], c, cfg.layers_per_block, g, i < len(boc) - 1, dtype, rngs)
            for i, c in enumerate(boc)])
        self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, dtype, rngs)
        self.conv_norm_out = _norm(boc[-1], g, dtype, rngs)
        self.conv_out = _conv(boc[-1], 2 * cfg.latent_channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (N,h,w,latent) after post_quant_conv -> image (N,h*f,w*f,out)."""

    def __init__(self, cfg: VAEConfig, dtype, rngs: nnx.Rngs):
        rev, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, dtype, rngs)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention, dtype, rngs)
        self.up_blocks = nnx.List([
            UpBlock(rev[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(rev) - 1, dtype, rngs)
            for i, c in enumerate(rev)])
        self.conv_norm_out = _norm(rev[-1], g, dtype, rngs)
        self.conv_out = _conv(rev[-1], cfg.out_channels, 3, dtype, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL-regularised VAE of Stable Diffusion. Params are float32; ``dtype`` is the compute dtype (e.g. bf16).

    Build with random weights as ``AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0))`` or load diffusers weights with
    ``terdit_jax.vae.convert.load_vae``.
    """

    def __init__(self, config: VAEConfig = VAEConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        lat = config.latent_channels
        self.encoder = Encoder(config, dtype, rngs)
        self.decoder = Decoder(config, dtype, rngs)
        self.quant_conv = _conv(2 * lat, 2 * lat, 1, dtype, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lat, lat, 1, dtype, rngs) if config.use_post_quant_conv else None

    def _check(self, x: jax.Array, channels: int, what: str):
        f = self.config.downsample_factor if what == "image" else 1
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"expected an NHWC {what} batch (N,H,W,{channels}) with H and W divisible by {f}, "
                             f"got shape {x.shape}; transpose NCHW inputs with x.transpose(0, 2, 3, 1).")

    def encode(self, x: jax.Array) -> jax.Array:
        """x (N,H,W,3) in [-1,1] -> moments (N,H/f,W/f,2*latent) float32: [mean, logvar] on the last axis (f=8 for SD)."""
        self._check(x, self.config.in_channels, "image")
        m = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return m.astype(jnp.float32)

    def decode(self, z: jax.Array, slice_size: int | None = DECODE_SLICE) -> jax.Array:
        """z (N,h,w,latent), unscaled -> image (N,h*f,w*f,3) float32, nominally in [-1,1] (not clipped).

        Decodes `slice_size` latents at a time (a `lax.map` over the batch; every latent on its own, GroupNorm is
        per image, so the output is the batch's): the activations live at once are a slice's, not the batch's
        (XLA's temporaries for 8 latents at 256 px: 0.27 GB one at a time, 1.89 GB at once; README, VAE).
        None or ≥ N: the whole batch at once."""
        self._check(z, self.config.latent_channels, "latent")
        n = z.shape[0]
        s = math.gcd(n, slice_size) if slice_size else n

        def run(z):
            z = z.astype(self.dtype)
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            return self.decoder(z).astype(jnp.float32)
        if s >= n:
            return run(z)
        out = jax.lax.map(run, z.reshape(n // s, s, *z.shape[1:]))
        return out.reshape(n, *out.shape[2:])


def sample_latent(moments: jax.Array, key: jax.Array) -> jax.Array:
    """Draws z = mean + exp(logvar/2) * eps from moments (..., 2C) -> (..., C).

    logvar is clipped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
    """
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)
