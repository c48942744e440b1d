"""Building blocks of the EDM2 U-Net, Config C, E and G side by side (EDM2 paper, Table 1 and Appendix B).

Magnitude-preserving (MP) primitives cite the paper's equations. What changes between the configurations:

======================  ==========================  ==========================  ===========================
                        C (improved baseline)       E (MP learned layers)       G (fully MP)
======================  ==========================  ==========================  ===========================
conv / linear           plain, no bias              forced weight norm (Eq.66)  forced weight norm (Eq.66)
normalization           group norm, no affine       group norm, no affine       pixel norm (encoder main)
activation              SiLU                        SiLU                        mp_silu (Eq. 81)
noise embedding         Fourier, 2 linear + SiLU    same, MP linear layers      MP Fourier (Eq. 75), 1 MP
residual / attention    sum                         sum                         mp_sum (Eq. 88)
skip connections        concatenation               concatenation               mp_cat (Eq. 103)
embedding modulation    (1 + emb)                   (1 + emb)                   (1 + gain·emb), gain ← 0
output                  group norm, SiLU, conv      group norm, SiLU, conv      conv with gain ← 0
attention q, k, v       RMS-normalized              RMS-normalized              pixel norm (cosine attn.)
======================  ==========================  ==========================  ===========================

Config G comes in two variants, chosen by three model options whose defaults are NVIDIA's G (NVlabs/edm2):

======================  =======================================  =======================================
option                  NVIDIA's G (default)                     edm2-multi-gpu's UNetG
======================  =======================================  =======================================
``pixel_norm``          ``"edm2"``: x / (1e-4 + ‖x‖/√n)           ``"rms"``: x / √(mean(x²) + 1e-8)
                        (encoder pixel norm and q, k, v)          (same places)
``mid_flavor``          ``"dec"``: the two middle blocks are      ``"enc"``: they are encoder blocks,
                        decoder blocks (no pixel norm)            whose input is pixel-normalized
``emb_gain_init``       0: (1 + 0·emb) at initialization          1: (1 + emb) at initialization
======================  =======================================  =======================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("C", "E", "G")


# ----------------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` to unit RMS over ``dim`` (all but the first by default): x / (ε + ‖x‖/√n).

    With all-but-first dims this is the weight normalization of Eq. 66; with ``dim=1`` the pixel norm of Config G.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def rms_normalize(x: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x²) + ε): the q/k/v normalization of Config C and E attention (and of edm2-multi-gpu's G)."""
    return x * torch.rsqrt(x.square().mean(dim=dim, keepdim=True) + eps)


PIXEL_NORMS = ("edm2", "rms")


def pixel_norm(x: torch.Tensor, dim: int, kind: str = "edm2") -> torch.Tensor:
    """Config G's pixel norm over ``dim``: ``"edm2"`` is :func:`normalize` (ε added to the RMS), ``"rms"`` is
    :func:`rms_normalize` (ε added to the mean square). Both give unit RMS; they differ only near zero."""
    return normalize(x, dim=dim) if kind == "edm2" else rms_normalize(x, dim=dim)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, Eq. 81: SiLU(x)/0.596 keeps unit variance for unit-normal inputs."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum, Eq. 88: ((1−t)·a + t·b) / sqrt((1−t)² + t²)."""
    if a.dtype != b.dtype:  # mixed precision (autocast): sum in the wider type
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation, Eq. 103, with balance ``t`` between ``a`` (0) and ``b`` (1)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=dim)


def group_norm(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Group normalization without learned affine (Config C and E); ``groups`` is capped to divide the channels."""
    return F.group_norm(x, math.gcd(groups, x.shape[1]), eps=1e-5)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """2× box-filter downsampling or nearest upsampling (the [1, 1] filter of the paper), or identity."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    raise ValueError(f"unknown resample mode {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# Learned layers.


class FourierFeatures(nn.Module):
    """Random Fourier features cos(x·f + φ)·a of a scalar per sample.

    Config G uses the magnitude-preserving version, a = √2 (Eq. 75); C and E use a = 1.
    ``freqs`` and ``phases`` are fixed buffers (f = 2π·N(0, 1), φ = 2π·U(0, 1)).
    """

    def __init__(self, num_channels: int, amplitude: float = 1.0, bandwidth: float = 1.0):
        super().__init__()
        self.amplitude = amplitude
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        y = y.cos()
        if self.amplitude != 1:
            y = y * self.amplitude
        return y.to(x.dtype)


class WeightLayer(nn.Module):
    """Bias-free convolution (``kernel=(k, k)``) or linear layer (``kernel=()``).

    With ``weight_norm`` (Config E and G) this is the MP layer of Eq. 47 with forced weight normalization (Eq. 66):
    in training the stored weight is first re-normalized in place, then every forward uses
    ``normalize(w) · gain / sqrt(fan_in)``. Without it (Config C) the weight is used as stored.

    Outside autograd (inference) the effective weight is computed once and cached; the cache is keyed on the
    parameters' identity and version counters, so ``train()``, ``load_state_dict`` or any in-place change refreshes it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=(), weight_norm: bool = True):
        super().__init__()
        self.weight_norm = weight_norm
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        if weight_norm:
            nn.init.normal_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # torch's default for Conv2d / Linear
        self._cached = (None, None)  # (key, weight); a tuple so the tensor stays out of state_dict()

    def _compute_weight(self, gain) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if not self.weight_norm:
            return w if gain is None else w * gain
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalization, Eq. 66
        w = normalize(w)
        scale = 1 / math.sqrt(w[0].numel())
        return w * (scale if gain is None else gain * scale)

    def effective_weight(self, gain=None, dtype=torch.float32) -> torch.Tensor:
        """The weight a forward pass uses: normalized and scaled for E/G, times ``gain`` when given."""
        if torch.compiler.is_compiling():
            return self._compute_weight(gain).to(dtype)  # compiled graphs fuse this; no Python-side cache
        if self.training or (torch.is_grad_enabled() and (self.weight.requires_grad or _requires_grad(gain))):
            self._cached = (None, None)
            return self._compute_weight(gain).to(dtype)
        key = (_version_key(self.weight), _version_key(gain), dtype)
        if key != self._cached[0]:
            self._cached = (key, self._compute_weight(gain).to(dtype))
        return self._cached[1]

    def train(self, mode: bool = True):
        self._cached = (None, None)
        return super().train(mode)

    def forward(self, x: torch.Tensor, gain=None) -> torch.Tensor:
        w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _requires_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _version_key(t):
    if not isinstance(t, torch.Tensor):
        return t
    return (id(t), t.data_ptr(), t._version, t.device)


# ----------------------------------------------------------------------------------------------------------------
# U-Net block (Figure 21), one class for all three configurations.


class UNetBlock(nn.Module):
    """Encoder or decoder block with optional self-attention.

    ``flavor`` is ``"enc"`` or ``"dec"``; ``resample`` is ``"keep"``, ``"down"`` or ``"up"``.
    Parameter names follow the official EDM2 network so that its checkpoints load key for key.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        architecture: str = "G",
        flavor: str = "enc",
        resample: str = "keep",
        attention: bool = False,
        channels_per_head: int | None = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        pixel_norm: str = "edm2",
        emb_gain_init: float = 0.0,
    ):
        super().__init__()
        if pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"unknown pixel_norm {pixel_norm!r}; expected one of {', '.join(PIXEL_NORMS)}")
        self.architecture = architecture
        self.pixel_norm = pixel_norm
        self.flavor = flavor
        self.resample = resample
        self.out_channels = out_channels
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.num_heads = 0
        if attention:
            head = out_channels if channels_per_head is None else channels_per_head
            if out_channels % head != 0:
                raise ValueError(f"{out_channels} channels do not split into heads of {head} channels")
            self.num_heads = out_channels // head

        wn = architecture != "C"
        is_g = architecture == "G"
        # Config G's encoder projects the skip first, so its first conv sees ``out_channels``.
        res0_in = out_channels if (is_g and flavor == "enc") else in_channels
        self.emb_gain = nn.Parameter(torch.full([], float(emb_gain_init))) if is_g else None
        self.conv_res0 = WeightLayer(res0_in, out_channels, (3, 3), wn)
        self.emb_linear = WeightLayer(emb_channels, out_channels, (), wn)
        self.conv_res1 = WeightLayer(out_channels, out_channels, (3, 3), wn)
        self.conv_skip = WeightLayer(in_channels, out_channels, (1, 1), wn) if in_channels != out_channels else None
        self.attn_qkv = WeightLayer(out_channels, out_channels * 3, (1, 1), wn) if self.num_heads else None
        self.attn_proj = WeightLayer(out_channels, out_channels, (1, 1), wn) if self.num_heads else None

    def _dropout(self, y):
        return F.dropout(y, p=self.dropout) if (self.training and self.dropout) else y

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention on normalized q, k, v; returns the projected output (not yet added to x)."""
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        if self.architecture == "G":
            qkv = pixel_norm(qkv, 2, self.pixel_norm)  # cosine attention (pixel norm per head)
        else:
            qkv = rms_normalize(qkv, dim=2)
        q, k, v = qkv.transpose(2, 4).unbind(3)  # each (n, heads, h·w, channels per head)
        # softmax(q·kᵀ/√d)·v, fused; matches the explicit formula within 1e-5 (tests/test_unet.py).
        y = F.scaled_dot_product_attention(q, k, v)
        return self.attn_proj(y.transpose(2, 3).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.architecture == "G":
            x = self._forward_g(x, emb)
        else:
            x = self._forward_ce(x, emb)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _forward_ce(self, x, emb):
        # Residual branch: norm → SiLU → resample → conv → norm → (1 + emb) → SiLU → dropout → conv.
        y = resample(F.silu(group_norm(x, 32)), self.resample)
        y = group_norm(self.conv_res0(y), 32)
        y = y * (1 + self.emb_linear(emb)).unsqueeze(2).unsqueeze(3).to(y.dtype)
        y = self.conv_res1(self._dropout(F.silu(y)))
        # Main branch: resample, 1×1 projection when the width changes.
        x = resample(x, self.resample)
        if self.conv_skip is not None:
            x = self.conv_skip(x)
        x = x + y
        if self.num_heads:
            x = x + self._attention(x)
        return x

    def _forward_g(self, x, emb):
        x = resample(x, self.resample)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x, 1, self.pixel_norm)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        y = self.conv_res1(self._dropout(y))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        return x
