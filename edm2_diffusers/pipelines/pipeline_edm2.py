"""EDM2Pipeline: image generation with an EDM2 U-Net, optional autoguidance and optional latent decoding.

Sampling follows EDM2 (Karras et al. 2024): the EDM Heun sampler by default, any diffusers EDM scheduler otherwise;
guidance with a second, weaker network as in "Guiding a Diffusion Model with a Bad Version of Itself" (Karras et al.
2024); latent models decode through a Stable Diffusion ``AutoencoderKL`` after undoing EDM2's per-channel latent
standardization.

Bundling rule: exports carry this file as diffusers custom code, flattened by ``edm2_diffusers.hub.remote_code``
together with the package modules it imports. It may therefore import only torch, numpy, diffusers and the ground
floor (``edm``, ``latents``, ``models``, ``schedulers``, ``pipelines``), never ``ema``, ``runs``, ``hub``, ``training``
or ``evaluation`` (checked by the import-linter layers and ``tests/test_architecture.py``).

Loading and saving: since this module may not import ``edm2_diffusers.hub``, the package's loader and
writer (configs and safetensors read with the installed classes; bundled code, ``export_info.json`` and model card
written next to diffusers' files) live in ``edm2_diffusers.hub.pipeline_io``, which the package root imports. The class
looks that module up in ``sys.modules`` when ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` is called:
with the package installed these use it (also from a copy of this class loaded as remote code); in a process without
the package the bundled copy keeps diffusers' own behaviour and copies its own standalone code files.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
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
        default_num_inference_steps (`int`, *optional*): the sampler steps a call uses when ``num_inference_steps``
            is not given (an export stores its run's value); ``DEFAULT_NUM_INFERENCE_STEPS`` (32) when unset.
        default_guidance_scale (`float`, *optional*): the guidance weight a call uses when ``guidance_scale`` is not
            given; 1 (no guidance) when unset.

    Both defaults are registered in the pipeline's config, so ``model_index.json`` carries them.
    """

    model_cpu_offload_seq = "unet->guidance_unet->vae"
    _optional_components = ["guidance_unet", "vae"]
    _callback_tensor_inputs = ["latents"]
    # Schedulers whose `timesteps` are EDM's c_noise = ¼·ln σ and whose `step` takes the raw network output F. Matched
    # by class name (subclasses too), so a copy of EDMHeunScheduler bundled with an export as remote code counts.
    _edm_schedulers = ("EDMHeunScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
    DEFAULT_NUM_INFERENCE_STEPS = 32  # used when neither the call nor the pipeline's config gives a step count
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
        default_num_inference_steps: int | None = None,
        default_guidance_scale: float | None = None,
    ):
        super().__init__()
        self._check_scheduler(scheduler)
        if default_num_inference_steps is not None:
            steps = default_num_inference_steps
            if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
                raise ValueError(f"default_num_inference_steps must be a positive integer, got {steps!r}")
            default_num_inference_steps = int(steps)
        if default_guidance_scale is not None:
            default_guidance_scale = float(default_guidance_scale)
            if not math.isfinite(default_guidance_scale):
                raise ValueError(f"default_guidance_scale must be finite, got {default_guidance_scale}")
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
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
        )
        self._num_timesteps = None
        self._interrupt = False
        self._guidance_scale = None

    @staticmethod
    def _is_a(obj, class_names) -> bool:
        return any(c.__name__ in class_names for c in type(obj).__mro__)

    @classmethod
    def _check_scheduler(cls, scheduler):
        if not cls._is_a(scheduler, cls._edm_schedulers):
            names = ", ".join(cls._edm_schedulers)
            raise ValueError(
                f"EDM2Pipeline needs an EDM scheduler ({names}): one whose timesteps are c_noise = ln(sigma)/4 and "
                f"whose step takes the raw EDM network output; got {type(scheduler).__name__}"
            )

    # -- state of the current call (diffusers conventions) --

    @property
    def num_timesteps(self) -> int | None:
        """Number of entries of the scheduler's ``timesteps`` in the current (or last) call: network evaluations."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. in ``callback_on_step_end``) to skip the remaining evaluations."""
        return self._interrupt

    @property
    def guidance_scale(self) -> float | None:
        """Guidance weight of the current (or last) call."""
        return self._guidance_scale

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
        if not labels.is_floating_point() and labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)  # integer indices of shape (N, 1)
        if labels.is_floating_point() and labels.ndim == 2:
            if labels.shape[1] != n:
                raise ValueError(f"one-hot class_labels must have {n} columns, got shape {tuple(labels.shape)}")
            onehot = labels.float()
        else:
            if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be integer class indices of shape (N,) or (N, 1), or one-hot of shape "
                    f"(N, {n}); "
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
            raise ValueError(
                f"got {onehot.shape[0]} class labels for batch_size={batch_size}; leave batch_size out to take it "
                f"from class_labels"
            )
        return onehot.to(device)

    @staticmethod
    def _batch_size_of_labels(class_labels) -> int | None:
        """Images asked for by ``class_labels`` (as DiT: one per label); None for one label or none."""
        if class_labels is None:
            return None
        labels = torch.as_tensor(class_labels)
        if labels.ndim == 0:
            return None
        if labels.ndim > 2:
            shape = tuple(labels.shape)
            raise ValueError(f"class_labels must have shape (N,), (N, 1) or (N, num_classes), got {shape}")
        return labels.shape[0]

    def _set_timesteps(self, num_inference_steps: int | None, sigmas, device):
        """``scheduler.set_timesteps`` with the step count or, for ``sigmas``, a custom schedule σ_0 > … > σ_{N−1}."""
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return
        if not self._is_a(self.scheduler, ("EDMHeunScheduler",)):
            # diffusers' EDMEulerScheduler reads `sigmas` as a ramp in [0, 1], not as noise levels.
            raise ValueError(
                f"sigmas= (a custom noise-level schedule) needs EDMHeunScheduler; {type(self.scheduler).__name__} "
                f"takes no noise levels in set_timesteps"
            )
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)

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
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, *optional*): number of images; taken from ``class_labels`` when omitted (one image
                per label, as DiT), else 1.
            num_inference_steps (`int`, *optional*): sampler steps N (the Heun sampler evaluates the network 2N−1
                times); defaults to the pipeline's ``default_num_inference_steps``, else 32.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling reproducible
                (initial noise, random class labels, stochastic sampler noise).
            class_labels (`Sequence[int]` or `torch.Tensor`, *optional*): class indices (a list, or a tensor of shape
                `(N,)` or `(N, 1)`; one index is used for all images) or one-hot rows `(N, num_classes)` for a
                class-conditional unet; random classes when omitted.
            guidance_scale (`float`, *optional*): guidance weight w of D = D_guide + w·(D_main − D_guide); 1 disables
                guidance (the guide network is then not run) and needs no ``guidance_unet``. Defaults to the
                pipeline's ``default_guidance_scale``, else 1.
            output_type (`str`): ``"pil"``, ``"np"`` (float `(N, H, W, C)` in [0, 1]), ``"pt"`` (float
                `(N, C, H, W)` in [0, 1]) or ``"latent"`` (the raw samples in the model's space).
            return_dict (`bool`): return an ``ImagePipelineOutput`` instead of a tuple.
            latents (`torch.Tensor`, *optional*): standard normal initial noise `(batch, C, h, w)`; it is scaled by
                the scheduler's ``init_noise_sigma``. Drawn from ``generator`` when omitted.
            sigmas (`Sequence[float]` or `torch.Tensor`, *optional*): a custom decreasing schedule of noise levels
                σ_0 … σ_{N−1} (σ_N = 0 is appended) instead of the scheduler's ρ-schedule; needs
                :class:`~edm2_diffusers.EDMHeunScheduler`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after every scheduler step (every network evaluation, i.e. every entry of ``scheduler.timesteps``) as
                ``callback_on_step_end(pipe, step, timestep, callback_kwargs)``; ``callback_kwargs`` holds the tensors
                named in ``callback_on_step_end_tensor_inputs``, and a tensor of the same name in the returned dict
                replaces it (e.g. ``{"latents": ...}``). Set ``pipe._interrupt = True`` to stop early.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): names of the tensors passed to the
                callback, from ``pipe._callback_tensor_inputs``; defaults to ``["latents"]``.

        Returns:
            `ImagePipelineOutput` with ``images``, or the tuple ``(images,)``.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        self._check_scheduler(self.scheduler)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {unknown}"
            )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")

        n_labels = self._batch_size_of_labels(class_labels)
        if batch_size is None:
            batch_size = n_labels if n_labels is not None else 1
        elif n_labels not in (None, 1, batch_size):
            raise ValueError(
                f"batch_size={batch_size} conflicts with the {n_labels} class_labels given; leave batch_size out to "
                f"take it from class_labels"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}")

        config = self.config
        stored_scale = getattr(config, "default_guidance_scale", None)
        if guidance_scale is None:
            guidance_scale = 1.0 if stored_scale is None else stored_scale
            source = " (the pipeline's default_guidance_scale)"
        else:
            source = ""
        if sigmas is None and num_inference_steps is None:
            stored_steps = getattr(config, "default_num_inference_steps", None)
            num_inference_steps = self.DEFAULT_NUM_INFERENCE_STEPS if stored_steps is None else stored_steps
        use_guide = guidance_scale != 1
        if use_guide and self.guidance_unet is None:
            raise ValueError(
                f"guidance_scale={guidance_scale}{source} needs a guidance_unet; this pipeline has none "
                f"(pass guidance_scale=1 to sample without guidance)"
            )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        device = self._execution_device
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        self._set_timesteps(num_inference_steps, sigmas, device)  # a bad schedule fails before noise is drawn
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        labels = self._class_labels(class_labels, batch_size, generator, device)
        guide_labels = self._guide_labels(labels) if use_guide else None

        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        nets, was_training = self._eval_nets()
        try:
            for i, t in enumerate(self.progress_bar(timesteps)):
                if self.interrupt:
                    continue
                model_in = self.scheduler.scale_model_input(latents, t)
                F = self._model(self.unet, model_in, t, labels)
                if use_guide:
                    # D is affine in F with the same c_skip, c_out for both networks, so interpolating F equals
                    # interpolating D: D_guide + w·(D_main − D_guide) (EDM2 guidance / autoguidance).
                    F_guide = self._model(self.guidance_unet, model_in, t, guide_labels)
                    F = F_guide + guidance_scale * (F - F_guide)
                latents = self.scheduler.step(F, t, latents, **step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {k: {"latents": latents}[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)

            if output_type == "latent":
                images = latents
            else:
                images = self.decode(latents)
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
