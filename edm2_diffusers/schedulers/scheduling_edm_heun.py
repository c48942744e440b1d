"""EDMHeunScheduler: the second-order Heun sampler of EDM (Karras et al. 2022, Algorithm 2) for diffusers pipelines.

EDM2 (Karras et al. 2024) samples with exactly this solver: the ρ-schedule of Eq. 5 (EDM), deterministic by default,
N steps costing 2N−1 network evaluations because the last step, to σ = 0, is a plain Euler step.

Bundling rule: exports carry this file as diffusers custom code, flattened by ``edm2_diffusers.hub.remote_code``
together with the package modules it imports. It may therefore import only torch, numpy, diffusers and the ground
floor (``edm``, ``latents``, ``models``, ``schedulers``, ``pipelines``), never ``ema``, ``runs``, ``hub``, ``training``
or ``evaluation`` (checked by the import-linter layers and ``tests/test_architecture.py``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..edm import edm_precondition, karras_sigmas, sigma_from_c_noise


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """Output of :meth:`EDMHeunScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the sample to feed the model at the next entry of ``scheduler.timesteps``
            (after the last entry: the final sample at σ = 0).
        pred_original_sample (`torch.Tensor`): the denoised estimate D(x; σ) from this evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    r"""EDM's stochastic/deterministic Heun sampler (Karras et al. 2022, Algorithm 2) in the diffusers scheduler API.

    The model is the raw network F of the EDM parameterization, D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), exactly
    as diffusers' ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler`` expect it: ``scale_model_input`` applies
    c_in, the model is called with ``timestep = c_noise = ¼·ln σ`` (the entries of ``scheduler.timesteps``), and
    ``step`` applies c_skip and c_out. A plain loop drives it::

        scheduler.set_timesteps(num_inference_steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            F = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(F, t, x, generator=generator).prev_sample

    ``timesteps`` holds 2N−1 entries for N steps, like diffusers' ``HeunDiscreteScheduler``: the first evaluation
    of each step (the Euler predictor at σ̂_i), then the corrector at σ_{i+1}; the last step (σ_{N−1} → 0) has no
    corrector.

    Stochastic churn (``s_churn > 0``): step i raises the noise level to σ̂_i = (1 + γ_i)·σ_i with
    γ_i = min(S_churn/N, √2 − 1) for σ_i ∈ [S_tmin, S_tmax] by adding fresh noise of std S_noise·√(σ̂_i² − σ_i²)
    before the model sees the sample. Because the model must be evaluated at the churned sample, that noise is added
    at the end of the previous ``step`` call (with that call's ``generator``), and ``timesteps`` hold c_noise(σ̂_i).
    For the first step there is no earlier call: ``init_noise_sigma`` already includes its churn, i.e. the initial
    sample is drawn directly with std √(σ_0² + S_noise²·(σ̂_0² − σ_0²)).

    Args:
        sigma_min (`float`, defaults to 0.002): smallest noise level of the schedule.
        sigma_max (`float`, defaults to 80.0): largest noise level (σ_0), the std of the initial noise.
        sigma_data (`float`, defaults to 0.5): std of the data, as used by the preconditioning.
        rho (`float`, defaults to 7.0): ρ of the schedule σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ.
        s_churn (`float`, defaults to 0.0): total stochasticity S_churn; 0 gives the deterministic sampler.
        s_tmin (`float`, defaults to 0.0), s_tmax (`float`, defaults to inf): noise range where churn is applied.
            ``scheduler_config.json`` is strict JSON, so an infinite ``s_tmax`` is stored as the largest float
            (1.7976931348623157e+308, which any σ stays below, so older readers sample the same); that value and
            ``None`` read back as ∞.
        s_noise (`float`, defaults to 1.0): std multiplier S_noise of the churn noise.
        prediction_type (`str`, defaults to ``"epsilon"``): what ``model_output`` is. ``"epsilon"`` is the raw EDM
            network output F (diffusers' EDM schedulers use this name for it, so their configs load into each other),
            ``"v_prediction"`` is F with c_out negated (as in diffusers' EDM schedulers), ``"sample"`` is D(x; σ)
            itself.
        num_train_timesteps (`int`, defaults to 1000): diffusers convention; EDM's σ is continuous and this is used
            only by ``len(scheduler)`` and as the step count of the default schedule set at construction.
        clip_sample (`bool`, defaults to False): clip the denoised estimate D(x; σ) to
            [−``clip_sample_range``, ``clip_sample_range``] at every network evaluation (predictor and corrector),
            before the ODE slope d = (x − D)/σ is formed, as edm2-multi-gpu's sampler does. Off: EDM's Algorithm 2.
        clip_sample_range (`float`, defaults to 1.0): the bound of ``clip_sample`` (pixel models live in [−1, 1]).
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float | None = float("inf"),
        s_noise: float = 1.0,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if sigma_data <= 0 or rho <= 0:
            raise ValueError(f"sigma_data and rho must be positive, got sigma_data={sigma_data}, rho={rho}")
        if s_churn < 0 or s_noise < 0:
            raise ValueError(f"s_churn and s_noise must be non-negative, got s_churn={s_churn}, s_noise={s_noise}")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be 'epsilon' (raw EDM network output), 'v_prediction' or 'sample', "
                f"got {prediction_type!r}"
            )
        if s_tmax is None or s_tmax >= sys.float_info.max:  # strict-JSON spellings of S_tmax = ∞ (`to_json_string`)
            s_tmax = math.inf
            self.register_to_config(s_tmax=s_tmax)
        if math.isnan(s_tmax) or math.isnan(s_tmin) or s_tmax == -math.inf:
            raise ValueError(f"s_tmin and s_tmax must be numbers (s_tmax may be inf), got {s_tmin}, {s_tmax}")
        if not (math.isfinite(clip_sample_range) and clip_sample_range > 0):
            raise ValueError(f"clip_sample_range must be positive and finite, got {clip_sample_range}")
        if int(num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps}")
        # A default schedule from construction on, as most diffusers schedulers have: num_train_timesteps steps of
        # the ρ-schedule. `num_inference_steps` stays None until a pipeline calls `set_timesteps`.
        self.set_timesteps(int(num_train_timesteps))
        self.num_inference_steps = None

    # -- schedule --

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ):
        """Set the N noise levels of the sampler and the 2N−1 model evaluations they take.

        Args:
            num_inference_steps (`int`): number of steps N (σ_0 … σ_{N−1}, then σ_N = 0); N ≥ 1.
            device (`str` or `torch.device`, *optional*): device of ``timesteps``.
            sigmas (`list[float]` or `torch.Tensor`, *optional*): a custom decreasing positive schedule σ_0 … σ_{N−1}
                to use instead of the ρ-schedule (a trailing 0 is appended).
        """
        if sigmas is not None:
            sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            if num_inference_steps is not None and num_inference_steps != sig.numel():
                raise ValueError(f"got num_inference_steps={num_inference_steps} and {sig.numel()} custom sigmas")
            if sig.numel() == 0 or (sig <= 0).any() or (sig[1:] >= sig[:-1]).any():
                raise ValueError("custom sigmas must be positive and strictly decreasing")
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
            c = self.config
            sig = karras_sigmas(int(num_inference_steps), c.sigma_min, c.sigma_max, c.rho, dtype=torch.float64)
        n = sig.numel()
        self.num_inference_steps = n
        self.step_sigmas = torch.cat([sig, sig.new_zeros(1)])

        # Algorithm 2, line 4: γ_i = min(S_churn/N, √2−1) inside [S_tmin, S_tmax], else 0.
        c = self.config
        gamma = min(c.s_churn / n, math.sqrt(2) - 1)
        inside = (sig >= c.s_tmin) & (sig <= c.s_tmax)
        self.gammas = torch.where(inside, torch.full_like(sig, gamma), torch.zeros_like(sig))
        sigma_hat = sig * (1 + self.gammas)

        # Evaluation k = 2i at σ̂_i (predictor of step i), k = 2i+1 at σ_{i+1} (corrector of step i, if σ_{i+1} > 0).
        evals = torch.stack([sigma_hat[:-1], sig[1:]], dim=1).reshape(-1) if n > 1 else sig.new_zeros(0)
        evals = torch.cat([evals, sigma_hat[-1:]])
        self.sigmas = torch.cat([evals, evals.new_zeros(1)]).to(torch.float32)
        self._eval_sigmas = evals  # float64 copy used by `step`
        self.timesteps = edm_precondition(evals, c.sigma_data).c_noise.to(device=device, dtype=torch.float32)
        self._reset_state()
        self._begin_index = None

    def _reset_state(self):
        self._step_index = None
        self._x_hat = None  # churned sample x̂_i of the step in progress
        self._d_hat = None  # its derivative d_i
        self._sigma_hat = None  # its noise level σ̂_i
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial noise: σ_0, including the first step's churn (if any) as explained above."""
        if self.step_sigmas is None:
            return float(self.config.sigma_max)
        s0 = float(self.step_sigmas[0])
        s0_hat = s0 * (1 + float(self.gammas[0]))
        return math.sqrt(s0**2 + self.config.s_noise**2 * (s0_hat**2 - s0**2))

    @property
    def step_index(self) -> int | None:
        """Index of the next model evaluation in ``timesteps`` (None before the first call)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First evaluation index, when set by the pipeline with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start sampling at evaluation ``begin_index`` of ``timesteps`` (for pipelines that skip the start).

        Args:
            begin_index (`int`): index into ``timesteps``; must be a predictor (even) evaluation.
        """
        if begin_index % 2:
            raise ValueError(f"begin_index must point at the first evaluation of a step (even), got {begin_index}")
        self._begin_index = begin_index

    def index_for_timestep(
        self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """Index of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``), as diffusers' Heun scheduler.

        Without churn σ_i is evaluated twice, by the corrector of step i−1 and then by the predictor of step i; of
        repeated entries the second (the predictor) is taken, so a pipeline that starts mid-schedule (e.g.
        image-to-image) without :meth:`set_begin_index` begins a step instead of landing on a corrector.

        Args:
            timestep (`float` or `torch.Tensor`): an entry of the schedule (c_noise).
            schedule_timesteps (`torch.Tensor`, *optional*): the schedule to search; ``self.timesteps`` by default.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of scheduler.timesteps; call set_timesteps(...) with the "
                f"schedule you sample with, and pass its entries"
            )
        return int(indices[1 if len(indices) > 1 else 0].item())

    def _init_step_index(self, timestep):
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    # -- preconditioning (EDM Table 1, via edm2_diffusers.edm) --

    def precondition_inputs(self, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """c_in(σ)·x, the network input.

        Args:
            sample (`torch.Tensor`): noisy sample x. sigma (`float` or `torch.Tensor`): its noise level.
        """
        return sample * edm_precondition(sigma, self.config.sigma_data).c_in.to(sample.device, sample.dtype)

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """c_noise(σ) = ¼·ln σ, the network's ``timestep``.

        Args:
            sigma (`float` or `torch.Tensor`): noise level(s).
        """
        return edm_precondition(sigma, self.config.sigma_data).c_noise

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: float | torch.Tensor
    ) -> torch.Tensor:
        """The denoised D(x; σ) = c_skip·x + c_out·F from the raw model output F (per ``prediction_type``).

        Args:
            sample (`torch.Tensor`): noisy sample x. model_output (`torch.Tensor`): F (or D for ``"sample"``).
            sigma (`float` or `torch.Tensor`): noise level of x.
        """
        dtype = torch.promote_types(sample.dtype, torch.float32)
        if self.config.prediction_type == "sample":
            return model_output.to(dtype)
        c = edm_precondition(sigma, self.config.sigma_data)
        c_skip = c.c_skip.to(sample.device, dtype)
        c_out = c.c_out.to(sample.device, dtype)
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * sample.to(dtype) + c_out * model_output.to(dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """c_in·x at the noise level of the current evaluation.

        Args:
            sample (`torch.Tensor`): the current sample (as returned by the previous ``step``).
            timestep (`float` or `torch.Tensor`): the current entry of ``timesteps``.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self._eval_sigmas[self._step_index])

    # -- sampling --

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple:
        """One model evaluation's worth of Algorithm 2: the Euler predictor (lines 5–8) or the Heun corrector (9–11).

        Args:
            model_output (`torch.Tensor`): the raw network output F at ``scale_model_input(sample, timestep)``.
            timestep (`float` or `torch.Tensor`): the current entry of ``timesteps``.
            sample (`torch.Tensor`): the current sample.
            generator (`torch.Generator`, *optional*): source of the churn noise (used only when ``s_churn > 0``).
            return_dict (`bool`): return an :class:`EDMHeunSchedulerOutput` instead of a tuple.

        Returns:
            :class:`EDMHeunSchedulerOutput` or `tuple` ``(prev_sample, pred_original_sample)``.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self._eval_sigmas):
            raise ValueError("the sampler has already finished; call set_timesteps again to sample anew")
        i = k // 2
        out_dtype = sample.dtype
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))  # at least float32 for the update
        sigma = float(self._eval_sigmas[k])
        denoised = self.precondition_outputs(x, model_output, sigma)
        if self.config.clip_sample:
            # edm2-multi-gpu clips D itself, at every evaluation, before the slope is formed.
            r = self.config.clip_sample_range
            denoised = denoised.clamp(-r, r)
        d = (x - denoised) / sigma  # dx/dσ of the probability-flow ODE (Algorithm 2, lines 7 and 10)

        if k % 2 == 0:
            # Predictor: Euler step from (x̂_i, σ̂_i) to σ_{i+1}.
            sigma_next = float(self.step_sigmas[i + 1])
            prev = x + (sigma_next - sigma) * d
            if sigma_next > 0:
                self._x_hat, self._d_hat, self._sigma_hat = x, d, sigma
        else:
            # Corrector: average the slopes at σ̂_i and σ_{i+1} (trapezoidal rule).
            if self._x_hat is None:
                raise ValueError("the Heun corrector was called without its predictor step")
            prev = self._x_hat + (sigma - self._sigma_hat) * 0.5 * (self._d_hat + d)
            self._x_hat = self._d_hat = None
            # Churn for step i+1 (Algorithm 2, lines 4–6), added now so that the model sees x̂_{i+1}.
            gamma = float(self.gammas[i + 1])
            if gamma > 0:
                noise = randn_tensor(prev.shape, generator=generator, device=prev.device, dtype=prev.dtype)
                prev = prev + self.config.s_noise * math.sqrt((sigma * (1 + gamma)) ** 2 - sigma**2) * noise
        self._step_index = k + 1
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev, denoised)
        return EDMHeunSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation is a predictor (first-order) evaluation."""
        return self._x_hat is None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = y + σ·n, with σ read from the c_noise ``timesteps`` (entries of ``timesteps`` map to ``sigmas``).

        Args:
            original_samples (`torch.Tensor`): clean samples y. noise (`torch.Tensor`): standard normal n.
            timesteps (`torch.Tensor`): c_noise = ¼·ln σ per sample (or a scalar).
        """
        t = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1).to(torch.float64)
        sigma = sigma_from_c_noise(t)
        if self.timesteps is not None:
            # Use the exact schedule value where a timestep is one of ours.
            for j, tj in enumerate(t.tolist()):
                hits = (self.timesteps.cpu().double() == tj).nonzero()
                if len(hits):
                    sigma[j] = self._eval_sigmas[int(hits[0])]
        sigma = sigma.to(original_samples.dtype).reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return original_samples + noise * sigma

    def to_json_string(self) -> str:
        """The config as strict JSON: an infinite ``s_tmax`` is written as the largest float (no ``Infinity``).

        Configs written before, with ``"s_tmax": Infinity``, still load (diffusers reads them with Python's json).
        """
        config = json.loads(super().to_json_string())
        if config.get("s_tmax") == math.inf:
            config["s_tmax"] = sys.float_info.max
        return json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def __len__(self):
        return self.config.num_train_timesteps


__all__ = ["EDMHeunScheduler", "EDMHeunSchedulerOutput"]
