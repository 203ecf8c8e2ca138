"""The denoising loop on the fast path: guidance, the scheduler's step and the next UNet input in one kernel a step.

Replaces: `pare/pipelines/stable_diffusion.py StableDiffusionPipeline.denoise` (diffusers: the loop of
`pipeline_stable_diffusion.py __call__`) inside the loop graph (`loop.py`, and its step-by-step entry, taken with a
step callback), for the samplers SD folders name most, under classifier-free guidance: DDIM with eta = 0 (SD 1.x's
and 2.x's pipelines), Euler without churn (SDXL's folders), Euler ancestral ("Euler a", A1111's default),
DPM-Solver++ (2M or 3M) and its SDE ("DPM++ 2M (SDE) (Karras)" in the UIs), UniPC ("UniPC": orders 1 to 3, the
data prediction, bh2 or bh1), DEIS ("DEIS", orders 1 to 3), PLMS (PNDM with skip_prk_steps: the scheduler of SD
1.x's folders, "PLMS" in the UIs) and LMS ("LMS", order 4). The UNet call is the reference loop's;
what follows it, guidance (Ho & Salimans, arXiv 2207.12598, eq. 6) and the step (DDIM's eq. 12, Song et al., arXiv
2010.02502, with sigma_t = 0; Euler's Algorithm 2, Karras et al., arXiv 2206.00364, with gamma = 0, and its
ancestral form, k-diffusion's; DPM-Solver++'s Algorithm 2 and its SDE, Lu et al., arXiv 2211.01095; UniPC's
corrector and predictor, Zhao et al., arXiv 2302.04867; DEIS's rhoAB step, Zhang & Chen, arXiv 2204.13902; PLMS's
Adams-Bashforth sum through DDIM's transfer, Liu et al., arXiv 2202.09778, eqs. 9 and 13; LMS's, k-diffusion's
`sample_lms`), is
`kernels/guided_step.py`: x' = c_x x + c_m m (+ c_a a) (+ c_z z), with m the guided output eps_u + w (eps_c - eps_u)
(DPM-Solver++ and UniPC: their data prediction, DEIS: its eps, a the previous step's; Euler a and the SDE: z their
noise, drawn as their steps draw it; UniPC: x first corrected, from its last sample and history; PLMS: up to three
terms of its history, and at its second call x the sample its first started from; LMS: its derivative, and up to
three kept), the coefficients solved on the host in float64 from the scheduler's own schedule (DDIM's and PLMS's
alpha_bar and previous timestep, the Euler, DPM-Solver, UniPC, DEIS and LMS sigmas, and the multistep solvers' orders
at that step), and the next input x' / sqrt(sigma'^2 + 1) for the Euler samplers and LMS. Every other loop (another
scheduler, eta > 0, churn, a noise-prediction DPM-Solver, a noise-prediction UniPC, PNDM's Runge-Kutta warm-up,
clipping or thresholding, guidance rescale, no guidance) is the reference's, unchanged.

Since the kernel writes both halves of the next UNet input from one value, they are equal by construction, and the
fast UNet is told so (`same_halves`, `unet.py`): it runs the text-free prefix of its first block on one half.
And since the text is the same tensor at every step, its cross-attention K and V are projected at the first step
only (`transformer.py hold_context`), where the loop runs as one program (inside the loop's graph, or eagerly).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from ..schedulers.scheduling_ddim import DDIMScheduler
from ..schedulers.scheduling_deis_multistep import DEISMultistepScheduler
from ..schedulers.scheduling_dpmsolver_multistep import LEARNED_VARIANCE_TYPES, DPMSolverMultistepScheduler
from ..schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from ..schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from ..schedulers.scheduling_lms_discrete import LMSDiscreteScheduler, lms_coefficient
from ..schedulers.scheduling_pndm import PNDMScheduler
from ..schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from .graph import replayable
from .kernels.guided_step import (PLMS_HEUN, PLMS_WEIGHTS, ancestral_coefficients, ddim_coefficients, deis_coefficients,
                                  derivative, dpm_coefficients, euler_coefficients, data_prediction, guided_step,
                                  pndm_coefficients, unipc_coefficients)
from .noise import step_draw
from .transformer import hold_context
from .unet import FastUNet2DConditionModel

FUSED_STEP = 1  # 0: the class's loop for every scheduler (the A/B's switch)
LMS_ORDER = 4  # the derivatives LMS combines: its `step`'s default, which the pipelines use
HOLD_TEXT = 1  # 0: the text's K and V projected at every step, as in the class's loop (the A/B's switch)


FUSED = (DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler,
         UniPCMultistepScheduler, DEISMultistepScheduler, PNDMScheduler, LMSDiscreteScheduler)  # exactly


def fusable(pipe, latents, guidance_scale: float, guidance_rescale: float, step_kwargs: dict | None) -> bool:
    """Whether this loop's steps are guidance and a DDIM (eta 0), Euler (no churn), Euler ancestral, DPM-Solver++ (2M
    or 3M, or its SDE), UniPC (to 3M, data prediction), DEIS, PLMS or LMS step, nothing more."""
    s, loop = pipe.scheduler, type(pipe).denoise
    # the loop this file twins, named (pare/fast sits below pare/pipelines, and does not import it): a subclass's
    # own loop (ControlNet's, inpainting's) is not this one
    twin = (loop.__module__, loop.__qualname__) == ("pare.pipelines.stable_diffusion", "StableDiffusionPipeline.denoise")
    if (not FUSED_STEP or not twin or type(s) not in FUSED
            or not torch.is_tensor(latents) or latents.ndim != 4
            or not pipe.uses_cfg(guidance_scale) or guidance_rescale != 0.0
            or s.config.prediction_type not in ("epsilon", "v_prediction")):
        return False
    c = s.config
    steps = dict(step_kwargs or {})
    steps.pop("generator", None)  # with eta = 0, no churn, or an ODE solver, nothing is drawn; Euler a draws from it
    if type(s) is EulerAncestralDiscreteScheduler:  # its noise drawn from the generator, as its step draws it
        return not steps
    if type(s) is DPMSolverMultistepScheduler:  # DPM-Solver++ (2M, its SDE too), the history of x_0 predictions
        return (not steps and c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++") and c.solver_order <= 3
                and not c.thresholding and c.variance_type not in LEARNED_VARIANCE_TYPES)
    if type(s) is UniPCMultistepScheduler:  # UniC then UniP to third order, the history of x_0 predictions
        return not steps and c.solver_order <= 3 and s.predict_x0 and not c.thresholding
    if type(s) is DEISMultistepScheduler:  # orders 1 to 3, the history of its eps
        return not steps and not c.thresholding
    if type(s) is PNDMScheduler:  # PLMS (no Runge-Kutta warm-up), the history of its outputs; alpha_bar on the host
        return not steps and c.skip_prk_steps and not s.alphas_cumprod.is_cuda
    if type(s) is LMSDiscreteScheduler:  # at its step's default order (the pipelines pass none)
        return not steps
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


class Step(NamedTuple):
    """One fused step's coefficients: x' = c_x x + c_m m + c_add addend (+ c_add2 addend2 + c_add3 addend3) (+ c_noise
    z), m the guided output (with `convert` = (p_x, p_g): p_x x + p_g times it, which the scheduler keeps), x the
    latents (or `base`), and the next UNet input next_scale x'."""
    c_x: float
    c_m: float
    next_scale: float = 1.0
    convert: tuple[float, float] | None = None
    addend: torch.Tensor | None = None  # DPM-Solver's, UniPC's and DEIS's last kept output
    c_add: float = 0.0
    addend2: torch.Tensor | None = None  # DPM-Solver's (3M), DEIS's and PLMS's (third order) output before that
    c_add2: float = 0.0
    addend3: torch.Tensor | None = None  # PLMS's (fourth order) output before that
    c_add3: float = 0.0
    draws: bool = False  # the loop draws noise z (Euler a, SDE DPM-Solver), as the scheduler's step would
    c_noise: float = 0.0  # x' gains c_noise z
    noise_dtype: torch.dtype | None = None  # the dtype its step draws z in (None: the model output's)
    correct: tuple | None = None  # UniPC's corrector: (last sample, the output before addend2 or None, coefficients)
    keeps_sample: str | None = None  # the scheduler's attribute that keeps the sample stepped from (UniPC's
    # `last_sample`, corrected or not; PLMS's `cur_sample` at its first call)
    base: torch.Tensor | None = None  # the sample stepped from where not the latents (PLMS's second call: cur_sample)


def keep_output(scheduler, kept: torch.Tensor) -> None:
    """The solver's history after a step, newest last, as its `step` leaves it: PLMS's `ets` (its last three, then
    this one), LMS's `derivatives` (its last LMS_ORDER), the other multistep solvers' `model_outputs` (shifted by
    one)."""
    if isinstance(scheduler, PNDMScheduler):
        scheduler.ets = scheduler.ets[-3:] + [kept]
    elif isinstance(scheduler, LMSDiscreteScheduler):
        scheduler.derivatives = (scheduler.derivatives + [kept])[-LMS_ORDER:]
    else:
        scheduler.model_outputs = scheduler.model_outputs[1:] + [kept]


def newest(history: list, terms: int) -> list:
    """The history's m1, m2, m3 (newest first) where a step of `terms` terms (m and 1 to 3 of them) reads them,
    else None: PLMS's and LMS's addends."""
    return [history[-j] if j < terms else None for j in (1, 2, 3)]


def alpha_bars(scheduler, t: int, prev_t: int) -> tuple[float, float]:
    """alpha_bar at t and at prev_t, the final alpha_bar before the schedule's start (DDIM's and PLMS's steps)."""
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return float(scheduler.alphas_cumprod[t]), float(alpha_prev)


def advance_multistep(scheduler) -> None:
    """A multistep solver's state after a step, as its `step` leaves it: one more step of history counted (up to its
    order), and the step index moved on."""
    if scheduler.lower_order_nums < scheduler.config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index += 1


def step_coefficients(scheduler, timestep) -> Step:
    """The step at `timestep`, its scheduler's state advanced as its `step` advances it (bar the history of outputs,
    which `denoise` adds to).
    DDIM: steps 1 and 2 of `DDIMScheduler.step` (its checks included), then `ddim_coefficients`; the next input is
    x' itself. Euler (and Euler a, whose noise the loop draws): sigma and the next sigma at its step index; the next
    input is its `scale_model_input` at the next sigma. DPM-Solver++: its step index, the order `order_of_step`
    gives, the sigmas about it, then `dpm_coefficients` (its SDE's too, whose noise the loop draws at every step,
    in float32); its last kept output is m1 at second order, and m1, m2 at third. UniPC: its step index, whether it
    corrects (`corrects`) and at what order (the last step's), its predictor's order (`order_of_step`), then
    `unipc_coefficients`; m1 and m2 where either uses them, m3 where the corrector does, and its last sample to
    correct. DEIS:
    its step index, its order (`order_of_step`), the levels of its step and history, then `deis_coefficients`; m1 at
    second order, m1 and m2 at third. PLMS: the branch `PNDMScheduler.step_plms` takes at its `counter` (the first
    call an Euler step that keeps its sample, the second that step redone from it with (m + m1) / 2, then
    Adams-Bashforth over its last 1 to 3 outputs), then `pndm_coefficients`; every call's output is kept but the
    second's. LMS: sigma and the next sigma at its step index, its order there (min(i + 1, 4)) and as many of that
    order's coefficients as it has derivatives with this one (img2img's first steps have fewer), `lms_coefficient`;
    its derivative is kept, and the next input scaled as Euler's."""
    c = scheduler.config
    if isinstance(scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)):
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        i = scheduler.step_index
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])  # a CPU tensor
        scheduler._step_index += 1
        next_scale = 1.0 / math.sqrt(sigma_next**2 + 1)
        if isinstance(scheduler, EulerAncestralDiscreteScheduler):
            c_x, c_m, c_z = ancestral_coefficients(sigma, sigma_next, c.prediction_type)
            return Step(c_x, c_m, next_scale, draws=True, c_noise=c_z)
        return Step(*euler_coefficients(sigma, sigma_next, c.prediction_type), next_scale)
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        i, n = scheduler._start_step(timestep)
        order = scheduler.order_of_step(i, n)
        sigmas = scheduler.sigmas  # (n + 1,), CPU
        levels = (float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[i - 1]) if order >= 2 else None)
        sde = c.algorithm_type == "sde-dpmsolver++"  # its noise drawn at every step (order 0 too), in float32
        convert, c_x, c_m, c_add, c_add2, c_z = dpm_coefficients(
            *levels, order, c.solver_type, c.prediction_type, sde, float(sigmas[i - 2]) if order == 3 else None)
        advance_multistep(scheduler)
        return Step(c_x, c_m, 1.0, convert, scheduler.model_outputs[-1] if order >= 2 else None, c_add,
                    scheduler.model_outputs[-2] if order == 3 else None, c_add2, draws=sde, c_noise=c_z,
                    noise_dtype=torch.float32 if sde else None)
    if isinstance(scheduler, UniPCMultistepScheduler):
        i, n = scheduler._start_step(timestep)
        corrector_order = scheduler.this_order if scheduler.corrects(i) else 0
        scheduler.timestep_list = scheduler.timestep_list[1:] + [timestep]
        scheduler.this_order = order = scheduler.order_of_step(i, n)
        sigmas = [float(scheduler.sigmas[j]) if j >= 0 else math.nan for j in range(i - 3, i + 2)]  # CPU
        q, (c_x, c_m, c_add, c_add2) = unipc_coefficients(tuple(sigmas), corrector_order, order, c.solver_type)
        advance_multistep(scheduler)
        history = scheduler.model_outputs  # [..., m3, m2, m1], newest last
        correct = (scheduler.last_sample, history[-3] if q[3] != 0.0 else None, q) if q is not None else None
        m1 = history[-1] if order >= 2 or q is not None else None  # the predictor's or UniC's
        m2 = history[-2] if order == 3 or (q is not None and q[2] != 0.0) else None
        return Step(c_x, c_m, 1.0, data_prediction(sigmas[3], c.prediction_type), m1, c_add, m2, c_add2,
                    correct=correct, keeps_sample="last_sample")
    if isinstance(scheduler, DEISMultistepScheduler):
        i, n = scheduler._start_step(timestep)
        order = scheduler.order_of_step(i, n)
        sigmas = scheduler.sigmas  # (n + 1,), CPU
        convert, c_x, c_m, c_add, c_add2 = deis_coefficients(tuple(float(sigmas[i - j]) for j in range(order)),
                                                             float(sigmas[i + 1]), c.prediction_type)
        advance_multistep(scheduler)
        return Step(c_x, c_m, 1.0, convert, scheduler.model_outputs[-1] if order >= 2 else None, c_add,
                    scheduler.model_outputs[-2] if order == 3 else None, c_add2)
    if isinstance(scheduler, LMSDiscreteScheduler):
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        i = scheduler.step_index
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])  # a CPU tensor
        history = scheduler.derivatives[-(LMS_ORDER - 1):]  # oldest first
        order = min(i + 1, LMS_ORDER)
        terms = min(order, len(history) + 1)  # its step zips the coefficients with the derivatives it has
        cs = [lms_coefficient(scheduler.sigmas, order, i, j) for j in range(terms)] + [0.0] * (4 - terms)
        scheduler._step_index += 1
        d1, d2, d3 = newest(history, terms)  # d_{i-1}, d_{i-2}, d_{i-3}
        return Step(1.0, cs[0], 1.0 / math.sqrt(sigma_next**2 + 1), derivative(sigma, c.prediction_type), d1, cs[1],
                    d2, cs[2], d3, cs[3])
    if isinstance(scheduler, PNDMScheduler):
        stride = c.num_train_timesteps // scheduler.num_inference_steps  # diffusers' stride, whatever the spacing
        t = scheduler._host_int(timestep)
        prev_t, history, base, keeps = t - stride, scheduler.ets[-3:], None, None  # history: newest last
        if scheduler.counter == 1:  # the first step redone from the sample it started at, with (m + m1) / 2
            t, prev_t, history, base, weights = t + stride, t, scheduler.ets, scheduler.cur_sample, PLMS_HEUN
            scheduler.cur_sample = None
        else:
            weights = PLMS_WEIGHTS[len(history) + 1]
            if not history:  # the first call: an Euler step, whose sample the second call starts from again
                keeps = "cur_sample"
        scheduler._check_timestep(t)
        c_x, (c_m, c_1, c_2, c_3) = pndm_coefficients(*alpha_bars(scheduler, t, prev_t), weights, c.prediction_type)
        scheduler.counter += 1
        m1, m2, m3 = newest(history, len(weights))
        return Step(c_x, c_m, 1.0, (0.0, 1.0) if base is None else None, m1, c_1, m2, c_2, m3, c_3,
                    keeps_sample=keeps, base=base)
    t = scheduler._check_timestep(timestep)
    return Step(*ddim_coefficients(*alpha_bars(scheduler, t, scheduler.previous_timestep(t)), c.prediction_type))


def denoise(pipe, latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
            step_kwargs: dict | None = None, added_cond_kwargs: dict | None = None, callback=None,
            callback_inputs=("latents",)):
    """`pipe`'s loop (its class's `denoise`), with guidance and the step fused where `fusable`."""
    if not fusable(pipe, latents, guidance_scale, guidance_rescale, step_kwargs):
        return type(pipe).denoise(pipe, latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale,
                                  step_kwargs, added_cond_kwargs, callback, callback_inputs)
    model_input = None  # made at the first step, and where a callback replaced the latents; else by the kernel
    generator = (step_kwargs or {}).get("generator")  # Euler a's noise
    halves = {"same_halves": True} if shares_prefix(pipe.unet) else {}
    # held K and V of the text: not where the UNet replays its own per-call graph, whose capture would hold them stale
    hold = hold_context(pipe.unet) if HOLD_TEXT and not replayable(latents) else contextlib.nullcontext()
    with hold:
        for i, t in enumerate(pipe.progress_bar(timesteps)):
            if model_input is None:  # (B, 4, h, w) -> (2B, 4, h, w); DDIM's scale_model_input is the identity
                model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                   added_cond_kwargs=added_cond_kwargs, **halves)  # (2B, 4, h, w)
            step = step_coefficients(pipe.scheduler, t)
            noise = None
            if step.draws:  # Euler a's and SDE DPM-Solver's noise, drawn as their steps draw it (in the loop graph,
                # the tape stands in: noise.py)
                noise = step_draw(pipe.scheduler)(latents.shape, generator, noise_pred.device,
                                                  step.noise_dtype or noise_pred.dtype)
            before = latents if step.base is None else step.base  # (PLMS's second call steps from its first's sample)
            latents, model_input, kept, corrected = guided_step(
                noise_pred, before, guidance_scale, step.c_x, step.c_m, next_input=i + 1 < len(timesteps),
                next_scale=step.next_scale, convert=step.convert, addend=step.addend, c_add=step.c_add,
                correct=step.correct, noise=noise, c_noise=step.c_noise, addend2=step.addend2, c_add2=step.c_add2,
                addend3=step.addend3, c_add3=step.c_add3)
            if kept is not None:  # DPM-Solver's and UniPC's history of x_0 predictions (DEIS's of eps, PLMS's of
                keep_output(pipe.scheduler, kept)  # its outputs), newest last
            if step.keeps_sample:  # UniPC's: the sample its predictor stepped from, corrected or not; PLMS's first
                setattr(pipe.scheduler, step.keeps_sample, corrected if corrected is not None else before)
            if callback is not None:  # diffusers' callback_on_step_end, as `pipeline_utils.step_callback` calls it
                tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                replaced = callback(pipe, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                prompt_embeds = replaced.get("prompt_embeds", prompt_embeds)
                if "latents" in replaced:  # new latents: the next input is made from them
                    latents, model_input = replaced["latents"], None
    return latents
