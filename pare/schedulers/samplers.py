"""The sampler names people know from the web UIs (A1111, ComfyUI), as pare scheduler classes and options.

    "DPM++ 2M Karras"  ->  DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=True)

The table follows diffusers' own mapping (docs: api/schedulers/overview, "A1111/k-diffusion ->
Diffusers"). A sampler is built from a pipeline folder's scheduler config with the options on top
(`make_scheduler`), as diffusers users write `Cls.from_config(pipe.scheduler.config, **options)`:
the folder keeps its betas, prediction_type and spacing; the name chooses the solver.

Each entry spells out the options that make the sampler what its name says, so a folder whose
config already holds other values for them (a fine-tune shipping Karras sigmas, a third-order
DPM-Solver) still gets the named sampler: "DPM++ 2M" sets use_karras_sigmas=False.

Choices where diffusers' table is silent or loose:
- "DPM++ SDE" / "DPM++ SDE Karras": A1111 runs k-diffusion's `sample_dpmpp_sde`, whose diffusers
  twin is DPMSolverSDEScheduler (needs torchsde; not in pare). diffusers' table maps these names
  to DPMSolverSinglestepScheduler; pare does too, with algorithm_type="sde-dpmsolver++", so that
  "SDE" injects noise as the name promises (the deterministic singlestep solver would give the
  same image for every seed).
- "PLMS" is PNDM with skip_prk_steps=True (as SD 1.x folders ship it); "DDIM", "DDPM", "UniPC",
  "DEIS" and "LCM" take the class's defaults.
- "Euler EDM" and "DPM++ 2M EDM" are for EDM-trained models (Playground v2.5); on an SD model
  their sigmas and input scaling do not match what the UNet was trained on.
- Names with no diffusers twin are refused with the reason (`NO_TWIN`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import get_scheduler_class


class Sampler(NamedTuple):
    class_name: str  # a key of pare.schedulers.SCHEDULER_MODULES
    options: dict[str, Any]  # config overrides on top of the folder's scheduler config


KARRAS = {"use_karras_sigmas": True}
NOT_KARRAS = {"use_karras_sigmas": False}
DPM_PP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPM_PP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler("EulerDiscreteScheduler", NOT_KARRAS),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", {}),
    "Heun": Sampler("HeunDiscreteScheduler", NOT_KARRAS),
    "DPM2": Sampler("KDPM2DiscreteScheduler", NOT_KARRAS),
    "DPM2 Karras": Sampler("KDPM2DiscreteScheduler", KARRAS),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", NOT_KARRAS),
    "DPM2 a Karras": Sampler("KDPM2AncestralDiscreteScheduler", KARRAS),
    "LMS": Sampler("LMSDiscreteScheduler", NOT_KARRAS),
    "LMS Karras": Sampler("LMSDiscreteScheduler", KARRAS),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler", {**DPM_PP_2M, **NOT_KARRAS}),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", {**DPM_PP_2M, **KARRAS}),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {**DPM_PP_SDE, **NOT_KARRAS}),
    "DPM++ 2M SDE Karras": Sampler("DPMSolverMultistepScheduler", {**DPM_PP_SDE, **KARRAS}),
    "DPM++ SDE": Sampler("DPMSolverSinglestepScheduler", {**DPM_PP_SDE, **NOT_KARRAS}),
    "DPM++ SDE Karras": Sampler("DPMSolverSinglestepScheduler", {**DPM_PP_SDE, **KARRAS}),
    "UniPC": Sampler("UniPCMultistepScheduler", {}),
    "DEIS": Sampler("DEISMultistepScheduler", {}),
    "DDIM": Sampler("DDIMScheduler", {}),
    "DDPM": Sampler("DDPMScheduler", {}),
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}),
    "LCM": Sampler("LCMScheduler", {}),
    "Euler EDM": Sampler("EDMEulerScheduler", {}),
    "DPM++ 2M EDM": Sampler("EDMDPMSolverMultistepScheduler", DPM_PP_2M),
}

# Web-UI names that diffusers has no scheduler for (its docs' table says N/A), and why.
NO_TWIN: dict[str, str] = {
    "DPM++ 2S a": "ancestral single-step DPM-Solver++(2S); diffusers has no twin "
                  "(DPMSolverSinglestepScheduler is close)",
    "DPM++ 2S a Karras": "as DPM++ 2S a, with Karras sigmas; diffusers has no twin",
    "DPM adaptive": "k-diffusion's adaptive-step DPM-Solver; diffusers has no twin",
    "DPM fast": "k-diffusion's fixed-order DPM-Solver; diffusers has no twin",
}


def describe(sampler: Sampler) -> str:
    """'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", ...)': the class and its options."""
    options = ", ".join(f"{key}={value!r}" for key, value in sampler.options.items())
    return f"{sampler.class_name}({options})"


def table() -> str:
    """The sampler table as text, one name per line (for `pare generate --help`)."""
    width = max(map(len, SAMPLERS))
    return "\n".join(f"  {name:<{width}}  {describe(sampler)}" for name, sampler in SAMPLERS.items())


def get_sampler(name: str) -> Sampler:
    """The (class name, options) for a web-UI sampler name; an unknown name is refused with the known ones."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    known = ", ".join(repr(n) for n in SAMPLERS)
    if name in NO_TWIN:
        raise ValueError(f"sampler {name!r} is not available: {NO_TWIN[name]}. Known samplers: {known}")
    raise ValueError(f"unknown sampler {name!r}; known samplers: {known}")


def resolve(name: str) -> Sampler:
    """A scheduler class name, alone or with options as `describe` writes them
    ('DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False)': Python literals, keywords only), or a
    web-UI sampler name (its class and options): what `pare parity --schedulers` and the benchmarks take. Anything
    else is refused, naming both lists; an option the class's constructor does not take is refused by name."""
    from . import SCHEDULERS

    if name in SCHEDULERS:
        return Sampler(name, {})
    if name in SAMPLERS:
        return SAMPLERS[name]
    if name.endswith(")") and "(" in name and name[:name.index("(")].strip() in SCHEDULERS:
        return _with_options(name)
    raise ValueError(f"{name!r} is neither a pare scheduler class ({', '.join(sorted(SCHEDULERS))}) nor a sampler "
                     f"name ({', '.join(repr(n) for n in SAMPLERS)})")


def _with_options(text: str) -> Sampler:
    """'Class(key=literal, ...)' -> Sampler(Class, {key: literal}), each key checked against the constructor."""
    import ast
    import inspect

    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise SyntaxError("options are keywords: Class(key=value, ...)")
        options = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if None in options:
            raise SyntaxError("no ** in options")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{text!r}: a scheduler with options is written Class(key=value, ...) with Python literals "
                         f"as values ({e})") from None
    cls = get_scheduler_class(call.func.id)
    taken = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - taken)
    if unknown:
        raise ValueError(f"{text!r}: {call.func.id} takes no option {', '.join(unknown)}; its options: "
                         f"{', '.join(sorted(taken))}")
    return Sampler(call.func.id, options)


def split_names(text: str) -> list[str]:
    """A comma list of scheduler names, where a name's options (in brackets) may hold commas of their own."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            names.append(text[start:i].strip())
            start = i + 1
    names.append(text[start:].strip())
    return [n for n in names if n]


def make_scheduler(name: str, config: dict | str):
    """The scheduler for sampler `name`, built from `config` (a pipeline's scheduler config, dict or folder)."""
    sampler = get_sampler(name)
    return get_scheduler_class(sampler.class_name).from_config(config, **sampler.options)
