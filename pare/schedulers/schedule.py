"""The noise schedule: how much noise each training timestep carries, and which timesteps sampling visits.

diffusers twin: the module-level helpers that diffusers copies into each scheduler file
(`schedulers/scheduling_ddim.py` `betas_for_alpha_bar`, `rescale_zero_terminal_snr`, and the
beta / spacing branches of `DDIMScheduler.__init__` and `DDPMScheduler.set_timesteps`).
pare writes each idea once; DDIM and DDPM both call it.

Notation (Ho et al., arXiv 2006.11239, section 2):
    betas[t]          -> beta_t, the variance added by forward step t
    alphas[t]         -> alpha_t = 1 - beta_t
    alphas_cumprod[t] -> alpha_bar_t = prod_{s <= t} alpha_s, so x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

# Every beta schedule the code below can build. A scheduler may accept a subset (DDIM: the first three).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
ALPHA_BAR_TRANSFORMS = ("cosine", "exp", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"
) -> torch.Tensor:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i).

    "cosine" is the schedule of Nichol & Dhariwal, arXiv 2102.09672, eq. 17, with s = 0.008;
    betas are capped at `max_beta` = 0.999 "to prevent singularities at the end of the
    diffusion process near t = T" (same section). "laplace" and "exp" are the other two
    transforms diffusers offers. diffusers twin: `betas_for_alpha_bar`.
    """
    if alpha_transform_type == "cosine":

        def alpha_bar(t):  # Nichol & Dhariwal eq. 17: f(t) = cos^2(((t + s) / (1 + s)) * pi / 2), s = 0.008
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "laplace":

        def alpha_bar(t):  # log-SNR lambda(t) from a Laplace distribution; alpha_bar as diffusers defines it
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    elif alpha_transform_type == "exp":

        def alpha_bar(t):
            return math.exp(t * -12.0)

    else:
        raise ValueError(f"alpha_transform_type={alpha_transform_type!r} is unknown; expected one of {ALPHA_BAR_TRANSFORMS}")

    n = num_diffusion_timesteps
    # Python floats (float64) for every ratio, then one rounding to float32, as diffusers does.
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """The float32 betas of a config: `trained_betas` if given, else the named `beta_schedule`.

    - linear:            DDPM's schedule (Ho et al. section 4: 1e-4 to 0.02 over T = 1000)
    - scaled_linear:     linear in sqrt(beta), the schedule Stable Diffusion was trained with
    - squaredcos_cap_v2: the cosine schedule (Nichol & Dhariwal, arXiv 2102.09672, eq. 17)
    - sigmoid, laplace:  DDPM-only extras of diffusers (GeoDiff's sigmoid; a Laplace log-SNR)
    """
    T = num_train_timesteps
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T)
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(T, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that the last timestep has zero SNR (pure noise).

    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891,
    Algorithm 1: keep sqrt(alpha_bar_0), make sqrt(alpha_bar_T) exactly 0, linear in between.
    The last beta becomes 1, so epsilon-prediction cannot recover x_0 at that timestep: the
    paper pairs this with v-prediction (section 3.2). diffusers twin: `rescale_zero_terminal_snr`.
    """
    if betas.numel() < 2:
        raise ValueError(f"rescale_betas_zero_snr needs at least 2 training timesteps, got {betas.numel()}")
    # 1. sqrt(alpha_bar_t) of the original schedule
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    # 2. shift so the last is 0, then scale so the first is unchanged (Algorithm 1, lines 6-9)
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    # 3. back to betas: alpha_t = alpha_bar_t / alpha_bar_{t-1}
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    """`num_inference_steps` as an int in [1, num_train_timesteps], or a ValueError saying why not.

    diffusers raises only above the maximum; 0 fails there with a ZeroDivisionError or an empty
    schedule, and a negative count silently gives an empty schedule. pare raises for all three.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise ValueError(
            f"num_inference_steps must be an int, got {num_inference_steps!r} ({type(num_inference_steps).__name__})"
        )
    n = int(num_inference_steps)
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={n} is out of range: it must be between 1 and num_train_timesteps="
            f"{num_train_timesteps}, the number of noise levels the model was trained on"
        )
    return n


def spaced_timesteps(
    timestep_spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0
) -> torch.Tensor:
    """The `num_inference_steps` training timesteps that sampling visits, in descending order (int64).

    The three spacings of Lin et al., arXiv 2305.08891, Table 2 (T = num_train_timesteps, n = num_inference_steps):

        leading   t_i = i * (T // n) + steps_offset        (DDIM's and SD's original choice; never reaches T-1)
        trailing  t_i = round(T - i * T / n) - 1           (starts at T-1, where zero terminal SNR lives)
        linspace  t_i = round(i * (T-1) / (n-1))           (both ends included)

    `steps_offset` applies to "leading" only, as in diffusers. The float arithmetic is numpy's
    float64 `arange` / `linspace`, as in diffusers: the same formulas in torch round differently at
    .5 ties for hundreds of (T, n) pairs, and the timesteps must be identical integers.

    Where pare differs from diffusers on purpose:
      - "trailing": for some n (61, 103, 121, ... of T = 1000) diffusers' `np.arange` overshoots
        by one float step and returns n + 1 timesteps ending in -1, which then indexes
        alphas_cumprod[-1] (the *noisiest* level) on the last step. pare returns the first n.
      - "leading" with steps_offset > 0 can exceed T-1 (n = T, steps_offset = 1 gives T);
        diffusers fails later with an IndexError inside step(); pare raises here.
    """
    T, n = num_train_timesteps, check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if timestep_spacing == "leading":
        step_ratio = T // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        step_ratio = T / n
        timesteps = np.round(np.arange(T, 0, -step_ratio))[:n].astype(np.int64) - 1
    elif timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing={timestep_spacing!r} is unknown; expected one of {TIMESTEP_SPACINGS}")

    if timesteps.max() >= T:
        raise ValueError(
            f"timestep_spacing='leading' with steps_offset={steps_offset} and num_inference_steps={n} gives timestep "
            f"{int(timesteps.max())}, past the last trained timestep {T - 1}: use fewer steps or steps_offset=0"
        )
    return torch.from_numpy(timesteps.copy())


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> torch.Tensor:
    """User-chosen timesteps as int64, checked: non-empty, strictly descending, within [0, T-1]."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty: give at least one timestep")
    for earlier, later in zip(timesteps, timesteps[1:]):
        if later >= earlier:
            raise ValueError(f"timesteps must be strictly descending, but {later} follows {earlier}")
    if timesteps[0] >= num_train_timesteps or timesteps[-1] < 0:
        raise ValueError(
            f"timesteps must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps}), "
            f"got {timesteps[0]} .. {timesteps[-1]}"
        )
    return torch.tensor(timesteps, dtype=torch.int64)
