"""Power-function EMA math (paper Section 3.1 and Appendix C).

A power-function EMA profile of exponent γ averages the training trajectory θ(τ) up to time t as

    θ̂_γ(t) = ∫_0^t p_{t,γ}(τ) θ(τ) dτ,   p_{t,γ}(τ) = (γ + 1) τ^γ / t^(γ + 1)   for 0 ≤ τ ≤ t      (Eq. 121)

Its width is described by the relative standard deviation σ_rel of p (Eq. 123), which is what users choose. "Time" is
any monotonic training clock (optimizer steps or images seen); every formula here is invariant to its scale.
"""

from __future__ import annotations

import numpy as np

# σ_rel of the γ = 0 profile (a uniform average): the widest profile with a positive exponent.
MAX_STD = float(np.sqrt(1.0 / 12.0))


def _check_stds(std: np.ndarray) -> None:
    bad = std[~((std > 0) & (std < MAX_STD))]
    if bad.size:
        raise ValueError(
            f"EMA std {float(bad.flat[0])!r} cannot be expressed by a power-function profile: the relative standard "
            f"deviation must lie in (0, {MAX_STD:.4f}) so that the exponent gamma stays positive"
        )


def exp_to_std(gamma):
    """Relative standard deviation of the power-function profile with exponent γ (Eq. 123).

    Args:
        gamma (`float` or array-like): exponent(s) γ > 0.

    Returns:
        `np.float64` or `np.ndarray`: σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))).
    """
    g = np.asarray(gamma, dtype=np.float64)
    if np.any(~(g > 0)):
        raise ValueError(f"power-function exponent gamma must be positive, got {float(g[~(g > 0)].flat[0])!r}")
    std = np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    return std[()] if std.ndim == 0 else std


def std_to_exp(std):
    """Exponent γ of the power-function profile with relative standard deviation `std` (Eq. 126, Algorithm 2).

    Inverting Eq. 123 gives the cubic γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, whose largest real root is γ. The
    cubic is convex for γ > −7/3 and σ⁻² lies to the right of that root, so Newton's method started there converges
    monotonically to it.

    Args:
        std (`float` or array-like): relative standard deviation(s), 0 < std < sqrt(1/12) ≈ 0.2887.

    Returns:
        `np.float64` or `np.ndarray`: γ, same shape as `std`.
    """
    std = np.asarray(std, dtype=np.float64)
    _check_stds(std)
    s = std**-2
    gamma = s.copy()
    for _ in range(200):
        f = (gamma + 2) ** 2 * (gamma + 3) - s * (gamma + 1)
        df = (gamma + 2) * (3 * gamma + 8) - s
        step = f / df
        gamma = gamma - step
        if np.all(np.abs(step) <= 1e-15 * np.maximum(gamma, 1.0)):
            break
    return gamma[()] if gamma.ndim == 0 else gamma


def power_function_beta(std, t_next, t_delta=1.0):
    """EMA decay β for one update that advances training time from `t_next - t_delta` to `t_next` (Eq. 127).

    Updating θ̂ ← β θ̂ + (1 − β) θ with β = (1 − Δt / t)^(γ + 1) keeps θ̂ equal to the power-function average of Eq. 121
    (with θ piecewise constant over each update). The first update (t_next = t_delta) gives β = 0: a plain copy.

    Args:
        std (`float`): relative standard deviation of the tracked profile.
        t_next (`float`): training time after the update (steps or images seen, including this update).
        t_delta (`float`, defaults to 1): time advanced by the update (1 step, or the global batch size in images).

    Returns:
        `np.float64`: β in [0, 1).
    """
    t_next = np.float64(t_next)
    t_delta = np.float64(t_delta)
    if not (t_delta > 0 and t_next >= t_delta):
        raise ValueError(f"need 0 < t_delta <= t_next for an EMA update, got t_next={t_next}, t_delta={t_delta}")
    return (1.0 - t_delta / t_next) ** (std_to_exp(std) + 1.0)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """Inner product ∫ p_{t_a,γ_a}(τ) p_{t_b,γ_b}(τ) dτ of two power-function profiles (Eq. 121), in closed form.

    Both profiles are non-zero on [0, min(t_a, t_b)], so with (t_lo, t_hi) the two end times and γ_hi the exponent of
    the profile that ends later, the integral is (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) t_hi) · (t_lo / t_hi)^γ_hi.
    All arguments broadcast against each other.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    a_ends_first = t_a <= t_b
    t_lo = np.where(a_ends_first, t_a, t_b)
    t_hi = np.where(a_ends_first, t_b, t_a)
    gamma_hi = np.where(a_ends_first, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_hi)
    return scale * np.exp(gamma_hi * np.log(t_lo / t_hi))


def solve_posthoc_coefficients(in_steps, in_stds, out_steps, out_stds) -> np.ndarray:
    """Coefficients that combine stored EMA snapshots into new EMA profiles (post-hoc EMA, Algorithm 3).

    Each target profile p_out is approximated by Σ_i X[i, j] p_in_i in the least-squares sense over τ: the normal
    equations A X = B use the closed-form inner products A[i, k] = <p_in_i, p_in_k> and B[i, j] = <p_in_i, p_out_j>.
    Each column of X is then rescaled to sum to 1, so that the reconstruction is an average of the snapshots. The
    reconstructed weights of target j are Σ_i X[i, j] θ̂_i.

    Args:
        in_steps (array-like): training time of each stored snapshot (> 0; steps or images, the same clock throughout).
        in_stds (array-like): relative standard deviation of each stored snapshot (broadcast against `in_steps`).
        out_steps (array-like): training time of each target profile (same clock as `in_steps`).
        out_stds (array-like): relative standard deviation of each target (broadcast against `out_steps`).

    Returns:
        `np.ndarray` of shape `[len(in), len(out)]`, float64.
    """
    in_t, in_s = (np.ravel(v).astype(np.float64) for v in np.broadcast_arrays(in_steps, in_stds))
    out_t, out_s = (np.ravel(v).astype(np.float64) for v in np.broadcast_arrays(out_steps, out_stds))
    if in_t.size == 0:
        raise ValueError("post-hoc EMA needs at least one stored snapshot")
    if out_t.size == 0:
        raise ValueError("post-hoc EMA needs at least one target profile")
    for name, t in (("snapshot", in_t), ("target", out_t)):
        if np.any(~(t > 0)):
            raise ValueError(f"{name} times must be positive, got {float(t[~(t > 0)][0])!r}")
    pairs = list(zip(in_t.tolist(), in_s.tolist()))
    if len(set(pairs)) != len(pairs):
        dup = next(p for p in pairs if pairs.count(p) > 1)
        raise ValueError(f"duplicate snapshot (time={dup[0]:g}, std={dup[1]:g}): each (time, std) pair must be unique")
    in_g = std_to_exp(in_s)
    out_g = std_to_exp(out_s)
    col = (slice(None), None)
    row = (None, slice(None))
    gram = profile_inner_product(in_t[col], in_g[col], in_t[row], in_g[row])
    cross = profile_inner_product(in_t[col], in_g[col], out_t[row], out_g[row])
    coefs = np.linalg.solve(gram, cross)
    return coefs / coefs.sum(axis=0, keepdims=True)
