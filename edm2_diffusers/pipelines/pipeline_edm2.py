"""EDM2Pipeline: image generation with an EDM2 U-Net, optional autoguidance and optional latent decoding.

Sampling follows EDM2 (Karras et al. 2024): the EDM Heun sampler by default, any diffusers EDM scheduler otherwise;
guidance with a second, weaker network as in "Guiding a Diffusion Model with a Bad Version of Itself" (Karras et al.
2024); latent models decode through a Stable Diffusion ``AutoencoderKL`` after undoing EDM2's per-channel latent
standardization.

Loading and saving: this module sits on the ground floor and is bundled into every export as custom code, so it may
import only torch, numpy, diffusers and the ground floor, never ``edm2_diffusers.hub``. The package's loader and
writer (configs and safetensors read with the installed classes; bundled code, ``export_info.json`` and model card
written next to diffusers' files) live in ``edm2_diffusers.hub.pipeline_io``, which the package root imports. The class
looks that module up in ``sys.modules`` when ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` is called:
with the package installed these use it (also from a copy of this class loaded as remote code); in a process without
the package the bundled copy keeps diffusers' own behaviour and copies its own standalone code files.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..latents import LATENT_FINAL_STD, SD_VAE_LATENT_MEAN, SD_VAE_LATENT_STD, unstandardize_latents


class EDM2Pipeline(DiffusionPipeline):
    r"""Unconditional or class-conditional image generation with an EDM2 U-Net.

    The sampling loop is the generic diffusers one, so :class:`~edm2_diffusers.EDMHeunScheduler` (EDM2's sampler),
    ``diffusers.EDMEulerScheduler`` and ``diffusers.EDMDPMSolverMultistepScheduler`` all drive it: the schedulers
    apply c_in and c_skip/c_out, the networks return the raw F.

    Args:
        unet (`EDM2UNet2DModel`): the denoiser network F_θ.
        scheduler (`SchedulerMixin`): an EDM scheduler whose ``timesteps`` are c_noise = ¼·ln σ.
        guidance_unet (`EDM2UNet2DModel`, *optional*): the guiding network of EDM2 guidance / autoguidance
            (a smaller or less trained model, conditional or not). Used when ``guidance_scale != 1``.
        vae (`AutoencoderKL`, *optional*): decoder for latent models; ``None`` for pixel models.
        latent_mean (`list[float]`, *optional*), latent_std (`list[float]`, *optional*): per-channel statistics of
            the VAE's raw latents; default to the Stable Diffusion VAE values when a ``vae`` is given.
        latent_final_std (`float`, defaults to 0.5): std of the model's standardized latents.
    """

    model_cpu_offload_seq = "unet->guidance_unet->vae"
    _optional_components = ["guidance_unet", "vae"]
    _package_io = "edm2_diffusers.hub.pipeline_io"  # module of the installed package's loader and writer, if imported

    @classmethod
    def _io(cls):
        return sys.modules.get(cls._package_io)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load an EDM2 pipeline export (a folder or Hub repository) as this class.

        With edm2-diffusers installed, the package's own classes are built from the configs and safetensors weights
        (no code from the export runs, ``trust_remote_code`` is not needed); ``variant="ema0100"`` picks an EMA
        length (diffusers' weight variants), ``torch_dtype`` / ``dtype`` the networks' dtype, and ``subfolder`` a
        pipeline stored in a subfolder. Otherwise (this class loaded as remote code) diffusers' loader runs.
        """
        io = cls._io()
        if io is None or not io.is_package_class(cls):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return io.load_pipeline(pretrained_model_name_or_path, pipeline_class=cls, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """diffusers' ``save_pretrained`` plus the custom code, ``export_info.json`` and model card of an export, so
        that ``DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)`` loads the folder."""
        super().save_pretrained(save_directory, **kwargs)
        io = self._io()
        if io is not None:
            io.save_pipeline_files(self, save_directory)
        else:
            self._copy_own_code(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Save (as :meth:`save_pretrained`) and upload in one commit that also deletes stale repository files."""
        io = self._io()
        if io is None:
            return super().push_to_hub(repo_id, **kwargs)
        return io.push_pipeline(self, repo_id, **kwargs)

    def _copy_own_code(self, save_directory) -> None:
        """Without the package: this class and its components are remote code already; copy their files."""
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        targets = {"_class_name": (type(self), save_directory)}
        for name in self.components:
            module = getattr(self, name)
            if module is not None and isinstance(index.get(name), list):
                targets[name] = (type(module), os.path.join(save_directory, name))
        for key, (cls, folder) in targets.items():
            source = inspect.getsourcefile(cls)
            if not cls.__module__.startswith("diffusers_modules.") or source is None:
                continue
            stem = os.path.splitext(os.path.basename(source))[0]
            shutil.copyfile(source, os.path.join(folder, stem + ".py"))
            index[key] = [stem, cls.__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)

    def __init__(
        self,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        guidance_unet: ModelMixin | None = None,
        vae: AutoencoderKL | None = None,
        latent_mean: list[float] | None = None,
        latent_std: list[float] | None = None,
        latent_final_std: float = LATENT_FINAL_STD,
    ):
        super().__init__()
        if vae is not None:
            latent_mean = list(SD_VAE_LATENT_MEAN) if latent_mean is None else latent_mean
            latent_std = list(SD_VAE_LATENT_STD) if latent_std is None else latent_std
        for name, values in (("latent_mean", latent_mean), ("latent_std", latent_std)):
            if values is not None and len(values) != unet.config.in_channels:
                raise ValueError(
                    f"{name} has {len(values)} entries for a unet with {unet.config.in_channels} channels"
                )
        if latent_std is not None and min(latent_std) <= 0:
            raise ValueError(f"latent_std must be positive, got {latent_std}")
        if guidance_unet is not None:
            for key in ("in_channels", "out_channels", "sample_size"):
                if guidance_unet.config[key] != unet.config[key]:
                    raise ValueError(
                        f"guidance_unet.{key}={guidance_unet.config[key]} differs from unet.{key}={unet.config[key]}"
                    )
        self.register_modules(unet=unet, scheduler=scheduler, guidance_unet=guidance_unet, vae=vae)
        self.register_to_config(
            latent_mean=None if latent_mean is None else [float(v) for v in latent_mean],
            latent_std=None if latent_std is None else [float(v) for v in latent_std],
            latent_final_std=float(latent_final_std),
        )

    # -- inputs --

    def _class_labels(self, class_labels, batch_size: int, generator, device) -> torch.Tensor | None:
        """One-hot float labels `(batch, num_classes)` for a conditional unet; random ones when none are given."""
        n = self.unet.config.num_class_embeds
        if n is None:
            if class_labels is not None:
                raise ValueError("class_labels were given but the unet is unconditional (num_class_embeds is None)")
            return None
        if class_labels is None:
            # Uniformly random classes drawn from the same generator(s) as the noise.
            if isinstance(generator, list):
                labels = torch.cat([torch.randint(n, (1,), generator=g, device=g.device).cpu() for g in generator])
            else:
                gen_device = generator.device if generator is not None else "cpu"
                labels = torch.randint(n, (batch_size,), generator=generator, device=gen_device).cpu()
            return torch.nn.functional.one_hot(labels, n).float().to(device)
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() and labels.ndim == 2:
            if labels.shape[1] != n:
                raise ValueError(f"one-hot class_labels must have {n} columns, got shape {tuple(labels.shape)}")
            onehot = labels.float()
        else:
            if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be integer class indices of shape (N,) or one-hot of shape (N, {n}); "
                    f"got dtype {labels.dtype} and shape {tuple(labels.shape)}"
                )
            labels = labels.reshape(-1).long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= n):
                raise ValueError(
                    f"class label out of range: got values in [{int(labels.min())}, {int(labels.max())}] "
                    f"for a model with {n} classes"
                )
            onehot = torch.nn.functional.one_hot(labels, n).float()
        if onehot.shape[0] == 1:
            onehot = onehot.expand(batch_size, -1)
        if onehot.shape[0] != batch_size:
            raise ValueError(f"got {onehot.shape[0]} class labels for batch_size={batch_size}")
        return onehot.to(device)

    def _guide_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        n = self.guidance_unet.config.num_class_embeds
        if n is None:
            return None
        if labels is None or labels.shape[1] != n:
            raise ValueError(
                f"guidance_unet is conditional with {n} classes but the unet has "
                f"{self.unet.config.num_class_embeds} (num_class_embeds must match)"
            )
        return labels

    # -- decoding --

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's output space -> images `(N, C, H, W)` in [0, 1].

        Pixel models work in [−1, 1]; latent models are unstandardized and decoded by the VAE, whose output EDM2
        reads in [0, 1].

        Args:
            latents (`torch.Tensor`): samples of the diffusion model.
        """
        if self.vae is None:
            return (latents.to(torch.float32) / 2 + 0.5).clamp(0, 1)
        c = self.config
        raw = unstandardize_latents(latents, c.latent_mean, c.latent_std, c.latent_final_std)
        images = self.vae.decode(raw.to(self.vae.dtype)).sample
        return images.to(torch.float32).clamp(0, 1)

    # -- sampling --

    def _eval_nets(self):
        nets = [m for m in (self.unet, self.guidance_unet, self.vae) if m is not None]
        was_training = [m.training for m in nets]
        for m in nets:
            m.eval()
        return nets, was_training

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 32,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): sampler steps N (the Heun sampler evaluates the network 2N−1 times).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling reproducible
                (initial noise, random class labels, stochastic sampler noise).
            class_labels (`Sequence[int]` or `torch.Tensor`, *optional*): class indices `(batch,)` (or one index for
                all) or one-hot rows `(batch, num_classes)` for a class-conditional unet; random classes when omitted.
            guidance_scale (`float`): guidance weight w of D = D_guide + w·(D_main − D_guide); 1 disables guidance
                (the guide network is then not run). Needs ``guidance_unet`` when not 1.
            output_type (`str`): ``"pil"``, ``"np"`` (float `(N, H, W, C)` in [0, 1]), ``"pt"`` (float
                `(N, C, H, W)` in [0, 1]) or ``"latent"`` (the raw samples in the model's space).
            return_dict (`bool`): return an ``ImagePipelineOutput`` instead of a tuple.
            latents (`torch.Tensor`, *optional*): standard normal initial noise `(batch, C, h, w)`; it is scaled by
                the scheduler's ``init_noise_sigma``. Drawn from ``generator`` when omitted.

        Returns:
            `ImagePipelineOutput` with ``images``, or the tuple ``(images,)``.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}")
        use_guide = guidance_scale != 1
        if use_guide and self.guidance_unet is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a guidance_unet; this pipeline has none")

        device = self._execution_device
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        labels = self._class_labels(class_labels, batch_size, generator, device)
        guide_labels = self._guide_labels(labels) if use_guide else None

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        nets, was_training = self._eval_nets()
        try:
            for t in self.progress_bar(self.scheduler.timesteps):
                model_in = self.scheduler.scale_model_input(x, t)
                F = self._model(self.unet, model_in, t, labels)
                if use_guide:
                    # D is affine in F with the same c_skip, c_out for both networks, so interpolating F equals
                    # interpolating D: D_guide + w·(D_main − D_guide) (EDM2 guidance / autoguidance).
                    F_guide = self._model(self.guidance_unet, model_in, t, guide_labels)
                    F = F_guide + guidance_scale * (F - F_guide)
                x = self.scheduler.step(F, t, x, **step_kwargs).prev_sample

            if output_type == "latent":
                images = x
            else:
                images = self.decode(x)
        finally:
            for m, flag in zip(nets, was_training):
                m.train(flag)

        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def _model(net, model_in: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        dtype = net.dtype
        labels = None if labels is None else labels.to(dtype)
        return net(model_in.to(dtype), t, class_labels=labels).sample.to(torch.float32)


__all__ = ["EDM2Pipeline"]
