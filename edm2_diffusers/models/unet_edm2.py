"""EDM2UNet2DModel: the EDM2 U-Net (paper Figure 21) with Config C, E or G blocks (Table 1).

Bundling rule: exports carry this file as diffusers custom code, flattened by ``edm2_diffusers.hub.remote_code``
together with the package modules it imports. It may therefore import only torch, numpy, diffusers and the ground
floor (``edm``, ``latents``, ``models``, ``schedulers``, ``pipelines``), never ``ema``, ``runs``, ``hub``, ``training``
or ``evaluation`` (checked by the import-linter layers and ``tests/test_architecture.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .layers import (
    ARCHITECTURES,
    PIXEL_NORMS,
    FourierFeatures,
    UNetBlock,
    WeightLayer,
    group_norm,
    mp_cat,
    mp_silu,
    mp_sum,
)


@dataclass
class EDM2UNet2DOutput(BaseOutput):
    """Output of :class:`EDM2UNet2DModel`.

    Args:
        sample (`torch.Tensor` of shape `(batch, out_channels, height, width)`): the raw network output F_θ.
    """

    sample: torch.Tensor


class EDM2UNet2DModel(ModelMixin, ConfigMixin):
    r"""The EDM2 U-Net F_θ, in diffusers' EDM convention.

    ``unet(sample, timestep).sample`` is F_θ(c_in·x; c_noise) with ``sample = c_in·x`` and ``timestep = c_noise =
    ¼·ln σ``; the denoiser is D = c_skip·x + c_out·F (see :func:`edm2_diffusers.edm.denoise`).
    ``unet.logvar(timestep)``
    is the learned uncertainty u(σ) of EDM2's loss (Eq. 21).

    Args:
        sample_size (`int`): image resolution; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels (`int`), out_channels (`int`): image channels in and out.
        architecture (`str`): block flavour, ``"C"``, ``"E"`` or ``"G"`` (paper Table 1).
        model_channels (`int`): base channel count; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        channel_mult (`tuple[int]`): per-resolution channel multipliers.
        channel_mult_noise (`int`, *optional*): Fourier features = ``model_channels * channel_mult_noise``
            (default: the first level's width).
        channel_mult_emb (`int`, *optional*): embedding width = ``model_channels * channel_mult_emb``
            (default: the widest level).
        num_blocks (`int`): blocks per resolution in the encoder, not counting resampling blocks (decoder: one more).
        attn_resolutions (`tuple[int]`): resolutions whose blocks have self-attention.
        channels_per_head (`int`, *optional*): attention head width; ``None`` gives one head per layer.
        num_class_embeds (`int`, *optional*): number of classes of a class-conditional model; ``None`` unconditional.
        label_balance, concat_balance, res_balance, attn_balance (`float`): mp_sum / mp_cat balances (Config G).
        clip_act (`float`, *optional*): clip block outputs to ±clip_act; ``None`` disables.
        dropout (`float`): dropout probability before each block's second convolution.
        logvar_channels (`int`): Fourier features of the u(σ) head.
        pixel_norm (`str`): Config G's pixel norm (encoder inputs and attention q, k, v): ``"edm2"`` (NVIDIA's,
            x / (1e-4 + RMS)) or ``"rms"`` (edm2-multi-gpu's UNetG, x / √(mean square + 1e-8)).
        mid_flavor (`str`): Config G's two middle blocks: ``"dec"`` (NVIDIA's) or ``"enc"`` (edm2-multi-gpu's
            UNetG, which pixel-normalizes their input).
        emb_gain_init (`float`): initial value of Config G's embedding gains: 0 (NVIDIA's) or 1 (edm2-multi-gpu's).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        architecture: str = "G",
        model_channels: int = 128,
        channel_mult: tuple = (1, 2, 2, 2),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 2,
        attn_resolutions: tuple = (16,),
        channels_per_head: int | None = 64,
        num_class_embeds: int | None = None,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        dropout: float = 0.0,
        logvar_channels: int = 128,
        pixel_norm: str = "edm2",
        mid_flavor: str = "dec",
        emb_gain_init: float = 0.0,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
        if pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"unknown pixel_norm {pixel_norm!r}; expected one of {', '.join(PIXEL_NORMS)}")
        if mid_flavor not in ("dec", "enc"):
            raise ValueError(f"unknown mid_flavor {mid_flavor!r}; expected 'dec' or 'enc'")
        g_only = {"pixel_norm": (pixel_norm, "edm2"), "mid_flavor": (mid_flavor, "dec")}
        g_only["emb_gain_init"] = (emb_gain_init, 0.0)
        if architecture != "G":
            for name, (value, default) in g_only.items():
                if value != default:
                    raise ValueError(f"{name}={value!r} applies to Config G only (architecture is {architecture!r})")
        levels = len(channel_mult)
        if levels < 1:
            raise ValueError("channel_mult must have at least one entry")
        if sample_size % (2 ** (levels - 1)) != 0:
            raise ValueError(
                f"sample_size {sample_size} is not divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                f"for {levels} resolution levels"
            )
        if num_class_embeds is not None and num_class_embeds < 1:
            raise ValueError(f"num_class_embeds must be None or positive, got {num_class_embeds}")

        wn = architecture != "C"
        is_g = architecture == "G"
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block_kwargs = dict(
            architecture=architecture,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )
        if is_g:
            block_kwargs.update(pixel_norm=pixel_norm, emb_gain_init=emb_gain_init)

        # Embedding: Fourier features of c_noise → linear (→ SiLU → linear for C/E), plus the class embedding.
        self.emb_fourier = FourierFeatures(cnoise, amplitude=math.sqrt(2) if is_g else 1.0)
        self.emb_noise = WeightLayer(cnoise, cemb, (), wn)
        self.emb_label = WeightLayer(num_class_embeds, cemb, (), wn) if num_class_embeds else None
        self.emb_out = None if is_g else WeightLayer(cemb, cemb, (), wn)
        self.out_gain = nn.Parameter(torch.zeros([])) if is_g else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, channels in enumerate(cblock):
            res = sample_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = WeightLayer(cout, channels, (3, 3), wn)
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(
                    cout, cout, cemb, flavor="enc", resample="down", **block_kwargs
                )
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, channels, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs
                )
                cout = channels

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [cblock[0]] + [b.out_channels for name, b in self.enc.items() if not name.endswith("_conv")]
        for level, channels in reversed(list(enumerate(cblock))):
            res = sample_size >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(
                    cout, cout, cemb, flavor=mid_flavor, attention=True, **block_kwargs
                )
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, cemb, flavor=mid_flavor, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, cemb, flavor="dec", resample="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout + skips.pop(),
                    channels,
                    cemb,
                    flavor="dec",
                    attention=res in attn_resolutions,
                    **block_kwargs,
                )
                cout = channels
        self.out_conv = WeightLayer(cout, out_channels, (3, 3), wn)

        # Uncertainty head u(σ) (EDM2 Eq. 21).
        self.logvar_fourier = FourierFeatures(logvar_channels, amplitude=math.sqrt(2) if is_g else 1.0)
        self.logvar_linear = WeightLayer(logvar_channels, 1, (), wn)

    # ------------------------------------------------------------------------------------------------------------

    def num_parameters_without_logvar(self) -> int:
        """Trainable parameters outside the u(σ) head (the size the reference implementations report)."""
        return sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and not n.startswith("logvar"))

    def _timestep(self, timestep, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if not t.is_floating_point():
            t = t.float()
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {batch} samples")
        return t

    def _labels(self, class_labels, batch: int, device, dtype) -> torch.Tensor | None:
        n = self.config.num_class_embeds
        if class_labels is None:
            # Like EDM2: a conditional model without labels sees the all-zero label (the unconditional input).
            return None if n is None else torch.zeros(batch, n, device=device, dtype=dtype)
        if n is None:
            raise ValueError("class_labels were given to an unconditional model (num_class_embeds is None)")
        class_labels = torch.as_tensor(class_labels, device=device)
        if not class_labels.is_floating_point():
            class_labels = class_labels.reshape(-1)
            # The range check reads tensor values, which torch.compile cannot trace (a graph break): eager only.
            eager = not torch.compiler.is_compiling()
            if eager and class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= n):
                raise ValueError(
                    f"class label out of range: got values in [{int(class_labels.min())}, {int(class_labels.max())}]"
                    f" for a model with {n} classes"
                )
            class_labels = F.one_hot(class_labels.long(), n)
        if class_labels.ndim != 2 or class_labels.shape[1] != n:
            raise ValueError(
                f"class_labels must be indices of shape (N,) or one-hot of shape (N, {n}); "
                f"got {tuple(class_labels.shape)}"
            )
        if class_labels.shape[0] == 1 and batch > 1:
            class_labels = class_labels.expand(batch, -1)
        if class_labels.shape[0] != batch:
            raise ValueError(f"class_labels has {class_labels.shape[0]} rows for a batch of {batch} samples")
        return class_labels.to(dtype)

    def embedding(self, timestep: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(timestep))
        if self.config.architecture == "G":
            if self.emb_label is not None:
                labels = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
                emb = mp_sum(emb, labels, t=self.config.label_balance)
            return mp_silu(emb)
        if self.emb_label is not None:
            emb = emb + self.emb_label(class_labels)
        return F.silu(self.emb_out(F.silu(emb)))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        r"""
        Args:
            sample (`torch.Tensor`): ``c_in·x`` of shape `(batch, in_channels, height, width)`.
            timestep (`torch.Tensor` or `float`): ``c_noise = ¼·ln σ``, shape `(batch,)` or a scalar.
            class_labels (`torch.Tensor`, *optional*): class indices `(batch,)` or one-hot / soft labels
                `(batch, num_class_embeds)`.
            return_dict (`bool`): return an :class:`EDM2UNet2DOutput` instead of a tuple.
        """
        if sample.ndim != 4:
            raise ValueError(f"sample must have shape (batch, channels, height, width), got {tuple(sample.shape)}")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels but the model expects in_channels={self.config.in_channels}"
            )
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"sample size {tuple(sample.shape[2:])} is not divisible by 2^(levels-1) = {factor}")
        batch = sample.shape[0]
        t = self._timestep(timestep, batch, sample.device).to(sample.dtype)
        labels = self._labels(class_labels, batch, sample.device, sample.dtype)
        emb = self.embedding(t, labels)

        is_g = self.config.architecture == "G"
        x = torch.cat([sample, torch.ones_like(sample[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                s = skips.pop()
                x = mp_cat_or_cat(x, s, is_g, self.config.concat_balance)
            x = block(x, emb)
        if is_g:
            x = self.out_conv(x, gain=self.out_gain)
        else:
            x = self.out_conv(F.silu(group_norm(x, 8)))
        if not return_dict:
            return (x,)
        return EDM2UNet2DOutput(sample=x)

    def logvar(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """u(σ) at ``timestep = c_noise = ¼·ln σ``, shape `(batch,)`."""
        t = torch.as_tensor(timestep, device=self.logvar_fourier.freqs.device)
        if not t.is_floating_point():
            t = t.float()
        t = t.reshape(-1).to(torch.float32)
        return self.logvar_linear(self.logvar_fourier(t)).reshape(-1)


def mp_cat_or_cat(x, skip, magnitude_preserving: bool, balance: float):
    """Skip connection: mp_cat (Eq. 103) for Config G, plain concatenation for C and E."""
    if magnitude_preserving:
        return mp_cat(x, skip, t=balance)
    return torch.cat([x, skip], dim=1)
