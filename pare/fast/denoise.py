"""The denoising loop on the fast path: guidance, the scheduler's step and the next UNet input in one kernel a step.

Replaces: `pare/pipelines/stable_diffusion.py StableDiffusionPipeline.denoise` (diffusers: the loop of
`pipeline_stable_diffusion.py __call__`) inside the loop graph (`loop.py`, and its step-by-step entry, taken with a
step callback), for the two deterministic one-step samplers SD folders name most, under classifier-free guidance:
DDIM with eta = 0 (SD 1.x's and 2.x's pipelines) and Euler without churn (SDXL's folders). The UNet call is the
reference loop's; what follows it, guidance (Ho & Salimans, arXiv 2207.12598, eq. 6) and the step (DDIM's eq. 12,
Song et al., arXiv 2010.02502, with sigma_t = 0; Euler's Algorithm 2, Karras et al., arXiv 2206.00364, with
gamma = 0), is `kernels/guided_step.py`: x' = c_x x + c_m (eps_u + w (eps_c - eps_u)), c_x and c_m solved on the
host in float64 from the scheduler's own schedule (DDIM's alpha_bar and previous timestep, Euler's sigmas), and the
next input x' / sqrt(sigma'^2 + 1) for Euler. Every other loop (another scheduler, eta > 0, churn, clipping or
thresholding, guidance rescale, no guidance) is the reference's, unchanged.

Since the kernel writes both halves of the next UNet input from one value, they are equal by construction, and the
fast UNet is told so (`same_halves`, `unet.py`): it runs the text-free prefix of its first block on one half.
And since the text is the same tensor at every step, its cross-attention K and V are projected at the first step
only (`transformer.py hold_context`), where the loop runs as one program (inside the loop's graph, or eagerly).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..schedulers.scheduling_ddim import DDIMScheduler
from ..schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from .graph import replayable
from .kernels.guided_step import ddim_coefficients, euler_coefficients, guided_step
from .transformer import hold_context
from .unet import FastUNet2DConditionModel

FUSED_STEP = 1  # 0: the class's loop for every scheduler (the A/B's switch)
HOLD_TEXT = 1  # 0: the text's K and V projected at every step, as in the class's loop (the A/B's switch)


def fusable(pipe, latents, guidance_scale: float, guidance_rescale: float, step_kwargs: dict | None) -> bool:
    """Whether this loop's steps are guidance and a deterministic DDIM or Euler step, nothing more."""
    s, loop = pipe.scheduler, type(pipe).denoise
    # the loop this file twins, named (pare/fast sits below pare/pipelines, and does not import it): a subclass's
    # own loop (ControlNet's, inpainting's) is not this one
    twin = (loop.__module__, loop.__qualname__) == ("pare.pipelines.stable_diffusion", "StableDiffusionPipeline.denoise")
    if (not FUSED_STEP or not twin or type(s) not in (DDIMScheduler, EulerDiscreteScheduler)
            or not torch.is_tensor(latents) or latents.ndim != 4
            or not pipe.uses_cfg(guidance_scale) or guidance_rescale != 0.0
            or s.config.prediction_type not in ("epsilon", "v_prediction")):
        return False
    c = s.config
    steps = dict(step_kwargs or {})
    steps.pop("generator", None)  # with eta = 0, or no churn, nothing is drawn
    if type(s) is EulerDiscreteScheduler:  # s_tmin, s_tmax and s_noise matter only with churn
        return set(steps) <= {"s_churn", "s_tmin", "s_tmax", "s_noise"} and float(steps.get("s_churn", 0.0)) == 0.0
    return (set(steps) <= {"eta"} and float(steps.get("eta", 0.0)) == 0.0
            and not c.clip_sample and not c.thresholding
            and not (c.prediction_type == "epsilon" and c.rescale_betas_zero_snr)  # the reference's error, there
            and not s.alphas_cumprod.is_cuda)  # read on the host below


def shares_prefix(unet) -> bool:
    """Whether the loop may tell the UNet that its input's halves are equal: a fast UNet with no hooks inside, since
    a hook on a block of the prefix would see one half where it expects the batch (the UNet's own hooks see the
    call as it is)."""
    return isinstance(unet, FastUNet2DConditionModel) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in list(unet.modules())[1:])


def step_coefficients(scheduler, timestep) -> tuple[float, float, float]:
    """(c_x, c_m, next_scale) of the step at `timestep`: x' = c_x x + c_m m, and the next UNet input next_scale x'.
    DDIM: steps 1 and 2 of `DDIMScheduler.step` (its checks included), then `ddim_coefficients`; the next input is
    x' itself. Euler: sigma and the next sigma at its step index, which advances as its `step` advances it; the next
    input is its `scale_model_input` at the next sigma."""
    if isinstance(scheduler, EulerDiscreteScheduler):
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        i = scheduler.step_index
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])  # a CPU tensor
        scheduler._step_index += 1
        c_x, c_m = euler_coefficients(sigma, sigma_next, scheduler.config.prediction_type)
        return c_x, c_m, 1.0 / math.sqrt(sigma_next**2 + 1)
    t = scheduler._check_timestep(timestep)
    prev_t = scheduler.previous_timestep(t)
    alpha_t = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod)
    return (*ddim_coefficients(alpha_t, alpha_prev, scheduler.config.prediction_type), 1.0)


def denoise(pipe, latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
            step_kwargs: dict | None = None, added_cond_kwargs: dict | None = None, callback=None,
            callback_inputs=("latents",)):
    """`pipe`'s loop (its class's `denoise`), with guidance and the step fused where `fusable`."""
    if not fusable(pipe, latents, guidance_scale, guidance_rescale, step_kwargs):
        return type(pipe).denoise(pipe, latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale,
                                  step_kwargs, added_cond_kwargs, callback, callback_inputs)
    model_input = None  # made at the first step, and where a callback replaced the latents; else by the kernel
    halves = {"same_halves": True} if shares_prefix(pipe.unet) else {}
    # held K and V of the text: not where the UNet replays its own per-call graph, whose capture would hold them stale
    hold = hold_context(pipe.unet) if HOLD_TEXT and not replayable(latents) else contextlib.nullcontext()
    with hold:
        for i, t in enumerate(pipe.progress_bar(timesteps)):
            if model_input is None:  # (B, 4, h, w) -> (2B, 4, h, w); DDIM's scale_model_input is the identity
                model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                   added_cond_kwargs=added_cond_kwargs, **halves)  # (2B, 4, h, w)
            c_x, c_m, next_scale = step_coefficients(pipe.scheduler, t)
            latents, model_input = guided_step(noise_pred, latents, guidance_scale, c_x, c_m,
                                               next_input=i + 1 < len(timesteps), next_scale=next_scale)
            if callback is not None:  # diffusers' callback_on_step_end, as `pipeline_utils.step_callback` calls it
                tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                replaced = callback(pipe, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                prompt_embeds = replaced.get("prompt_embeds", prompt_embeds)
                if "latents" in replaced:  # new latents: the next input is made from them
                    latents, model_input = replaced["latents"], None
    return latents
