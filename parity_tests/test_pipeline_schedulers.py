"""Every registered scheduler through pare's SD and SDXL pipelines, step by step against diffusers.

- the registry: each name resolves, lazily, to the class of that name in the module named after
  diffusers' file;
- switching, `Other.from_config(pipe.scheduler.config)`: the same resolved config as diffusers',
  the keys the class does not use named in one log line, unknown values refused;
- SD and SDXL, text-to-image and image-to-image, with each scheduler switched in from the folder's
  config (5 steps; img2img runs the last 3, twice over for second-order schedulers): the latents
  after every step and the image agree with diffusers' (`tiny_components.assert_same_run`);
- every web-UI sampler of `pare.schedulers.samplers`, custom `timesteps` / `sigmas`, and the
  folders real checkpoints ship (SD1.5 PNDM, SDXL Euler, SDXL-Turbo, Playground v2.5, LCM).

Parametrized over the registry: a scheduler whose module has not landed is skipped, by name.
"""

from __future__ import annotations

import functools
import inspect
import logging

import numpy as np
import pytest
import torch

import pare
from pare.schedulers import SCHEDULER_MODULES, SCHEDULERS, get_scheduler_class, module_present
from pare.schedulers.samplers import SAMPLERS, make_scheduler

from .scheduler_folders import SHIPPED_SCHEDULERS, folder_with_scheduler, name_scheduler
from .tiny_components import assert_same_run, diffusers_clip_skip_shim, pipeline_folder

diffusers = pytest.importorskip("diffusers")

ALL = list(SCHEDULER_MODULES)


def landed(name: str) -> None:
    if not module_present(name):
        pytest.skip(f"pare/schedulers/{SCHEDULER_MODULES[name]}.py has not landed yet")


def their_class(name: str):
    return getattr(diffusers, name)


@functools.cache
def their_default_config(name: str) -> dict:
    """diffusers' `name()` config, with its _use_default_values (every key)."""
    return dict(their_class(name)().config)


# --- the registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_registered_name_resolves_to_that_class_in_diffusers_module(name):
    assert module_present(name), f"pare/schedulers/{SCHEDULER_MODULES[name]}.py is missing"
    cls = get_scheduler_class(name)
    assert cls.__name__ == name and SCHEDULERS[name] is cls and getattr(pare, name) is cls
    assert getattr(pare.schedulers, name) is cls
    # pare's file is named after diffusers' file for the class.
    assert cls.__module__ == f"pare.schedulers.{SCHEDULER_MODULES[name]}"
    assert their_class(name).__module__.rsplit(".", 1)[-1] == SCHEDULER_MODULES[name]
    # As in diffusers: the order pipelines read, and the optional step arguments they pass.
    assert cls.order == their_class(name).order
    for method, argument in (("step", "generator"), ("step", "eta"), ("set_timesteps", "timesteps"),
                             ("set_timesteps", "sigmas")):
        ours = argument in inspect.signature(getattr(cls, method)).parameters
        theirs = argument in inspect.signature(getattr(their_class(name), method)).parameters
        assert ours == theirs, f"{name}.{method}: pare {'takes' if ours else 'lacks'} {argument!r}, diffusers not"


def test_registry_is_lazy_and_refuses_unknown_names():
    import subprocess
    import sys

    # Importing pare.schedulers imports no scheduler module: one that fails to import breaks only itself.
    code = ("import sys, pare.schedulers; "
            "print(sorted(m for m in sys.modules if m.startswith('pare.schedulers.scheduling_') "
            "and m != 'pare.schedulers.scheduling_utils'))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
    assert set(SCHEDULERS) == {name for name in SCHEDULER_MODULES if module_present(name)}
    assert all(pare._EXPORTS.get(name) == "pare.schedulers" for name in SCHEDULER_MODULES)
    with pytest.raises(ValueError, match=r"'DPMSolverSDEScheduler' is not implemented in pare; known schedulers: \["):
        get_scheduler_class("DPMSolverSDEScheduler")
    assert "DPMSolverSDEScheduler" not in SCHEDULERS
    with pytest.raises(KeyError):
        SCHEDULERS["DPMSolverSDEScheduler"]


# --- switching: Other.from_config(pipe.scheduler.config) --------------------------------------------

# Configs a scheduler is switched from: SD1.5's folder (PNDM), SDXL's (Euler, with leftovers), and
# each class's defaults (below).
SOURCES = {"sd15": SHIPPED_SCHEDULERS["sd15"], "sdxl": SHIPPED_SCHEDULERS["sdxl"],
           "dpm-finetune": SHIPPED_SCHEDULERS["dpmpp-2m-karras-finetune"]}


def comparable(config) -> dict:
    """A config as JSON sees it, without diffusers' metadata keys: tuples -> lists, arrays -> lists."""
    def plain(value):
        if isinstance(value, (list, tuple, np.ndarray)):
            return [plain(v) for v in value]
        return value.item() if isinstance(value, np.generic) else value

    return {k: plain(v) for k, v in dict(config).items() if not k.startswith("_")}


def init_keys(name: str) -> set[str]:
    """The config keys of diffusers' class `name`: its __init__ arguments."""
    return set(inspect.signature(their_class(name).__init__).parameters) - {"self", "kwargs"}


def assert_same_config(name: str, ours, theirs) -> None:
    """pare's config holds exactly the keys of diffusers' __init__, with diffusers' values.

    diffusers' config also carries the source's other keys ("hidden", kept for switching back);
    pare's holds only its own, so those are left out of the comparison.
    """
    unsupported = get_scheduler_class(name).unsupported_config  # accepted at its one supported value, not stored
    assert set(ours.config) | set(unsupported) == init_keys(name)
    assert set(ours.config).isdisjoint(unsupported)
    theirs = comparable(theirs.config)
    assert comparable(ours.config) == {k: v for k, v in theirs.items() if k in ours.config}
    assert comparable(unsupported) == {k: v for k, v in theirs.items() if k in unsupported}


def assert_same_switch(name: str, source: dict, caplog):
    """`name`.from_config(source) in both libraries: one resolved config, the unused keys named in one line."""
    theirs = their_class(name).from_config(dict(source))
    with caplog.at_level(logging.WARNING, logger="pare"):
        caplog.clear()
        ours = get_scheduler_class(name).from_config(dict(source))
    assert_same_config(name, ours, theirs)
    # The log names the keys `name` does not use, but not those the source took from its defaults
    # (diffusers' _use_default_values): they are dropped, not passed on.
    defaulted = set(source.get("_use_default_values", ()))
    unused = {k for k in source if not k.startswith("_") and k not in defaulted and k not in ours.config
              and k not in get_scheduler_class(name).unsupported_config}
    lines = [r.getMessage() for r in caplog.records if r.name == "pare" and "not used" in r.getMessage()]
    if unused:
        assert len(lines) == 1 and name in lines[0], lines
        named = set(lines[0].split("[", 1)[1].rsplit("]", 1)[0].replace("'", "").split(", "))
        assert named == unused, (named, unused)
    else:
        assert lines == []
    return ours, theirs


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("name", ALL)
def test_switching_from_a_folder_config_gives_diffusers_config(name, source, caplog):
    landed(name)
    assert_same_switch(name, SOURCES[source], caplog)


@pytest.mark.parametrize("name", ALL)
def test_switching_from_every_other_class_gives_diffusers_config(name, caplog):
    """A config written by each registered class (its defaults, as save_config writes them) loads in `name`."""
    landed(name)
    for other in SCHEDULERS:
        source = {"_class_name": other, **their_default_config(other)}  # holds _use_default_values: every key
        ours, _ = assert_same_switch(name, source, caplog)
        # The pare object's own config switches the same way (it carries no _class_name).
        again = get_scheduler_class(name).from_config(get_scheduler_class(other).from_config(source).config)
        assert comparable(again.config) == comparable(ours.config)


CHAINS = [("PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"),
          ("DPMSolverMultistepScheduler", "EDMEulerScheduler", "UniPCMultistepScheduler",
           "DPMSolverMultistepScheduler"),
          ("EulerDiscreteScheduler", "LCMScheduler", "HeunDiscreteScheduler", "DDIMScheduler")]


@pytest.mark.parametrize("chain", CHAINS, ids="->".join)
def test_switching_back_and_forth_keeps_diffusers_config(chain, caplog):
    """Each hop from the last object's config: the keys a class does not use come back at a later hop
    (SD1.5's skip_prk_steps survives Euler and DPM-Solver), the defaulted ones do not, as in diffusers."""
    for name in chain:
        landed(name)
    source = SHIPPED_SCHEDULERS["sd15" if chain[0] == "PNDMScheduler" else "dpmpp-2m-karras-finetune"]
    ours = get_scheduler_class(chain[0]).from_config(dict(source))
    theirs = their_class(chain[0]).from_config(dict(source))
    for name in chain[1:]:
        ours, theirs = get_scheduler_class(name).from_config(ours.config), their_class(name).from_config(theirs.config)
        assert_same_config(name, ours, theirs)
    if chain[0] == "PNDMScheduler":
        assert ours.config.skip_prk_steps is True and ours.config.timestep_spacing == "leading"


# A config file written by another class holds every key, its defaults included, so the values
# are switched over too. Where the libraries part, pare's outcome (None: it builds) and why.
WRITTEN_CONFIG_DEPARTURES = {
    # DPM-Solver's files write variance_type null; diffusers' DDPM then falls through to fixed_small.
    ("DDPMScheduler", "DPMSolverMultistepScheduler"): ValueError,
    ("DDPMScheduler", "DPMSolverSinglestepScheduler"): ValueError,
    # diffusers maps algorithm_type "deis" to "dpmsolver++" but checks final_sigmas_type="zero" against
    # "deis" before the mapping, so it refuses every DEIS file; pare maps, then checks.
    ("DPMSolverMultistepScheduler", "DEISMultistepScheduler"): None,
    ("DPMSolverSinglestepScheduler", "DEISMultistepScheduler"): None,
    ("EDMDPMSolverMultistepScheduler", "DEISMultistepScheduler"): None,
    # Singlestep's lower_order_final=False: UniPC refuses a multistep step to sigma = 0, diffusers goes on.
    ("UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"): ValueError,
    # sigma_min / sigma_max null (Euler, UniPC write them): diffusers fails with a TypeError.
    ("EDMEulerScheduler", "EulerDiscreteScheduler"): ValueError,
    ("EDMEulerScheduler", "UniPCMultistepScheduler"): ValueError,
    ("EDMDPMSolverMultistepScheduler", "EulerDiscreteScheduler"): ValueError,
    ("EDMDPMSolverMultistepScheduler", "UniPCMultistepScheduler"): ValueError,
}


def outcome(build):
    try:
        return build(), None
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return None, type(e)


@pytest.mark.parametrize("name", ALL)
def test_switching_from_every_other_class_file_gives_diffusers_config(name, caplog):
    """As scheduler_config.json holds it: every key, no _use_default_values."""
    landed(name)
    for other in SCHEDULERS:
        written = {"_class_name": other, **{k: v for k, v in their_default_config(other).items()
                                            if k != "_use_default_values"}}
        theirs, their_error = outcome(lambda: their_class(name).from_config(dict(written)))
        ours, our_error = outcome(lambda: get_scheduler_class(name).from_config(dict(written)))
        if (name, other) in WRITTEN_CONFIG_DEPARTURES:
            assert our_error == WRITTEN_CONFIG_DEPARTURES[name, other], (name, other, our_error, their_error)
            continue
        assert our_error is None and their_error is None, (name, other, our_error, their_error)
        assert_same_switch(name, written, caplog)


# One bad value per key that every class of the family reads, and the classes that read it.
BAD_VALUES = {"prediction_type": "x0", "beta_schedule": "cosine", "timestep_spacing": "middle",
              "algorithm_type": "dpmsolver+++", "solver_type": "rk4"}


@pytest.mark.parametrize("name", ALL)
def test_unknown_config_values_are_refused_naming_the_key(name):
    """diffusers refuses some of these at construction, others only at step(); pare refuses each, naming it."""
    landed(name)
    cls = get_scheduler_class(name)
    keys = [k for k in BAD_VALUES if k in cls.config_keys()]
    for key in keys:
        with pytest.raises(ValueError, match=key):
            scheduler = cls.from_config({key: BAD_VALUES[key]})
            scheduler.set_timesteps(5)
            sample = torch.ones(1, 4, 2, 2)
            scheduler.step(sample, scheduler.timesteps[0], sample)


# --- every scheduler through the pipelines -----------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    folder = pipeline_folder("tiny-sd")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    diffusers_clip_skip_shim(theirs)
    return pare.StableDiffusionPipeline.from_pretrained(folder), theirs


@pytest.fixture(scope="module")
def sdxl():
    folder = pipeline_folder("tiny-sdxl")
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    return pare.StableDiffusionXLPipeline.from_pretrained(folder), theirs


PIPELINES = {  # (family, img2img) -> (pare class, diffusers class)
    ("sd", False): ("StableDiffusionPipeline", "StableDiffusionPipeline"),
    ("sd", True): ("StableDiffusionImg2ImgPipeline", "StableDiffusionImg2ImgPipeline"),
    ("sdxl", False): ("StableDiffusionXLPipeline", "StableDiffusionXLPipeline"),
    ("sdxl", True): ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
}


def switched(loaded, family: str, img2img: bool, make):
    """Both pipelines on the loaded components, the scheduler replaced by `make(library, base scheduler)`."""
    ours, theirs = loaded
    our_cls, their_cls = (getattr(lib, n) for lib, n in zip((pare, diffusers), PIPELINES[family, img2img]))
    extra = {"add_watermarker": False} if family == "sdxl" else {}
    ours = our_cls(**{**ours.components, "scheduler": make(pare, ours.scheduler)})
    theirs = their_cls(**{**theirs.components, "scheduler": make(diffusers, theirs.scheduler)}, **extra)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def image(seed: int = 0, height: int = 16, width: int = 16):
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


# 5 steps (odd); two prompts with one generator each, so ancestral / SDE noise is drawn per image.
TXT2IMG = dict(prompt=["a cat", "the dog"], negative_prompt=["dark", "blurry"], num_inference_steps=5, n_generators=2,
               eta=0.5, height=16, width=16)
IMG2IMG = dict(prompt="a cat", image=image(), strength=0.6, num_inference_steps=5)  # the last int(5 * 0.6) = 3


def run_case(loaded, family, img2img, name, label, options=None, **overrides):
    ours, theirs = switched(loaded, family, img2img,
                            lambda lib, base: getattr(lib, name).from_config(base.config, **(options or {})))
    assert type(ours.scheduler).__name__ == name == type(theirs.scheduler).__name__
    kwargs = {**(IMG2IMG if img2img else TXT2IMG), **overrides}
    steps, _ = assert_same_run(ours, theirs, label, **kwargs)
    return steps, ours


def expected_calls(scheduler, num_inference_steps: int, strength: float | None = None) -> int:
    """UNet calls of a pipeline run: len(timesteps), the img2img tail starting at t_start * order."""
    scheduler.set_timesteps(num_inference_steps)
    if strength is None:
        return len(scheduler.timesteps)
    t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    return len(scheduler.timesteps) - t_start * scheduler.order


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("name", ALL)
def test_txt2img_with_every_scheduler_matches_diffusers_step_by_step(request, name, family):
    landed(name)
    steps, ours = run_case(request.getfixturevalue(family), family, False, name, f"{family} txt2img {name}")
    assert len(steps) == expected_calls(ours.scheduler, TXT2IMG["num_inference_steps"])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("name", ALL)
def test_img2img_with_every_scheduler_matches_diffusers_step_by_step(request, name, family):
    """SDEdit's tail: timesteps[t_start * order:], begin_index set so that add_noise and step start there."""
    landed(name)
    steps, ours = run_case(request.getfixturevalue(family), family, True, name, f"{family} img2img {name}")
    assert len(steps) == expected_calls(ours.scheduler, IMG2IMG["num_inference_steps"], IMG2IMG["strength"])


def test_second_order_scheduler_visits_timesteps_twice_and_img2img_starts_at_t_start_times_order(sd):
    """Heun: 2n - 1 UNet calls for n steps; img2img slices at t_start * 2 and starts its state there."""
    landed("HeunDiscreteScheduler")
    steps, ours = run_case(sd, "sd", False, "HeunDiscreteScheduler", "heun txt2img", num_inference_steps=3)
    assert len(steps) == 5
    steps, ours = run_case(sd, "sd", True, "HeunDiscreteScheduler", "heun img2img", num_inference_steps=5,
                           strength=0.6)
    assert len(steps) == 2 * 3 - 1


def test_pipeline_can_be_called_twice_with_a_multistep_scheduler(sd):
    """set_timesteps resets the multistep state (model_outputs, step_index): a second call is a fresh run."""
    landed("DPMSolverMultistepScheduler")
    ours, theirs = switched(sd, "sd", False, lambda lib, base: lib.DPMSolverMultistepScheduler.from_config(base.config))
    kwargs = dict(prompt="a cat", num_inference_steps=3, height=16, width=16, output_type="np")
    first = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    img2img = pare.StableDiffusionImg2ImgPipeline(**ours.components)
    img2img(prompt="a cat", image=image(), strength=0.6, num_inference_steps=5,
            generator=torch.Generator().manual_seed(1))
    assert_same_run(ours, theirs, "second call", prompt="a cat", num_inference_steps=3, height=16, width=16)
    np.testing.assert_array_equal(first, ours(generator=torch.Generator().manual_seed(0), **kwargs).images)


# --- samplers: the web-UI names ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_matches_diffusers_switched_the_same_way(sd, sampler):
    """pare's `make_scheduler(name, config)` = diffusers' `Cls.from_config(config, **options)`, step by step."""
    class_name, options = SAMPLERS[sampler]
    landed(class_name)
    assert set(options) <= set(inspect.signature(their_class(class_name).__init__).parameters)

    def make(lib, base):
        if lib is pare:
            return make_scheduler(sampler, base.config)
        return their_class(class_name).from_config(base.config, **options)

    ours, theirs = switched(sd, "sd", False, make)
    assert_same_config(class_name, ours.scheduler, theirs.scheduler)
    assert_same_run(ours, theirs, f"sampler {sampler!r}", **{**TXT2IMG, "num_inference_steps": 3})


# --- custom timesteps and sigmas: diffusers' retrieve_timesteps -----------------------------------------

CUSTOM = {"timesteps": [999, 800, 601, 400, 201], "sigmas": [14.0, 6.0, 2.5, 0.9, 0.3]}
# EDMEulerScheduler's `sigmas` are not sigmas but the ramp in [0, 1] its sigma schedule maps (diffusers' meaning).
CUSTOM_FOR = {"EDMEulerScheduler": {"sigmas": [0.0, 0.3, 0.55, 0.8, 1.0]}}


@pytest.mark.parametrize("argument", sorted(CUSTOM))
@pytest.mark.parametrize("name", ALL)
def test_custom_timesteps_or_sigmas_pass_through_or_are_refused_as_in_diffusers(sd, name, argument):
    landed(name)
    ours, theirs = switched(sd, "sd", False, lambda lib, base: getattr(lib, name).from_config(base.config))
    custom = CUSTOM_FOR.get(name, {}).get(argument, CUSTOM[argument])
    kwargs = dict(prompt="a cat", height=16, width=16, **{argument: custom})
    if argument not in inspect.signature(their_class(name).set_timesteps).parameters:
        with pytest.raises(ValueError, match=f"takes no custom `{argument}`"):
            ours(**kwargs)
        return
    their_kwargs = dict(kwargs)
    try:
        theirs(**kwargs, output_type="latent")
    except ValueError:  # the scheduler itself refuses this list (UniPC: sigmas only with flow sigmas): so does pare
        with pytest.raises(ValueError):
            ours(**kwargs)
        return
    except (AttributeError, TypeError):
        # diffusers' EDMEulerScheduler.set_timesteps calls sigmas.to(...): from a pipeline it takes a
        # tensor only. pare takes the list; diffusers is given the same values as a tensor.
        their_kwargs[argument] = torch.tensor(custom)
    steps, _ = assert_same_run(ours, theirs, f"{name} custom {argument}", **kwargs) if their_kwargs == kwargs \
        else assert_same_run_split(ours, theirs, f"{name} custom {argument}", kwargs, their_kwargs)
    # img2img with a custom list: strength applies to len(scheduler.timesteps), as diffusers does.
    ours_i, theirs_i = switched(sd, "sd", True, lambda lib, base: getattr(lib, name).from_config(base.config))
    img2img = dict(prompt="a cat", image=image(), strength=0.6)
    assert_same_run_split(ours_i, theirs_i, f"{name} img2img custom {argument}",
                          {**img2img, argument: kwargs[argument]}, {**img2img, argument: their_kwargs[argument]})


def assert_same_run_split(ours, theirs, label, our_kwargs, their_kwargs):
    """assert_same_run, with diffusers given `their_kwargs` (the same values in the type it needs)."""
    from pare.parity import assert_parity

    from .tiny_components import assert_same_images, record_run

    our_steps, our_images = record_run(ours, output_type="np", **our_kwargs)
    their_steps, their_images = record_run(theirs, output_type="np", **their_kwargs)
    assert len(our_steps) == len(their_steps)
    for i, (a, b) in enumerate(zip(our_steps, their_steps)):
        assert_parity(f"{label}: latents after step {i}", a, b, scope="end_to_end")
    assert_same_images(our_images, their_images, label)
    return our_steps, our_images


def test_timesteps_and_sigmas_together_are_refused(sd):
    ours, _ = sd
    with pytest.raises(ValueError, match="at most one of `timesteps` and `sigmas`"):
        ours(prompt="a cat", timesteps=[999, 500], sigmas=[3.0, 1.0])


# --- folders as checkpoints ship them ----------------------------------------------------------------

SHIPPED_FOLDERS = [("tiny-sd", "sd15"), ("tiny-sdxl", "sdxl"), ("tiny-sdxl", "sdxl-turbo"),
                   ("tiny-sdxl", "playground-v2.5"), ("tiny-sd", "dpmpp-2m-karras-finetune")]


@pytest.mark.parametrize(("family", "shipped"), SHIPPED_FOLDERS)
def test_folder_loads_the_scheduler_it_names_and_matches_diffusers(tmp_path, family, shipped, caplog):
    name = SHIPPED_SCHEDULERS[shipped]["_class_name"]
    landed(name)
    folder = folder_with_scheduler(family, shipped, tmp_path / shipped)
    xl = family == "tiny-sdxl"
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = (pare.StableDiffusionXLPipeline if xl else pare.StableDiffusionPipeline).from_pretrained(folder)
    theirs = (diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline).from_pretrained(
        folder, **({"add_watermarker": False} if xl else {}))
    assert type(ours.scheduler).__name__ == name == type(theirs.scheduler).__name__
    assert_same_config(name, ours.scheduler, theirs.scheduler)
    leftovers = sorted(k for k in SHIPPED_SCHEDULERS[shipped]
                       if not k.startswith("_") and k not in ours.scheduler.config)
    if leftovers:  # SDXL's Euler config carries PNDM's and DDIM's keys: named, once
        assert any(str(leftovers) in r.getMessage() for r in caplog.records), caplog.text
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert_same_run(ours, theirs, f"{shipped} folder", prompt="a cat", num_inference_steps=5, height=16, width=16)


def test_lcm_folder_embeds_the_guidance_scale_and_matches_diffusers(tmp_path):
    """An LCM-distilled UNet (time_cond_proj_dim) takes w - 1 as an input and runs without CFG, in both."""
    landed("LCMScheduler")
    from pare.configs import TINY_LCM_UNET, TINY_TEXT, TINY_VAE
    from pare.parity.checkpoint import build_reference_pipeline

    folder = tmp_path / "lcm"
    build_reference_pipeline(diffusers, (TINY_LCM_UNET, TINY_VAE, TINY_TEXT, None), SHIPPED_SCHEDULERS["lcm"],
                             seed=3).save_pretrained(folder, safe_serialization=True)
    name_scheduler(folder, SHIPPED_SCHEDULERS["lcm"])
    ours = pare.StableDiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(ours.scheduler, pare.LCMScheduler) and not ours.uses_cfg(8.0)
    calls = []
    ours.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["timestep_cond"]), with_kwargs=True)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", num_inference_steps=3, guidance_scale=8.0, height=16, width=16)
    steps, _ = assert_same_run(ours, theirs, "LCM folder", **kwargs)
    assert len(calls) == 3 and calls[0].shape == (1, TINY_LCM_UNET["time_cond_proj_dim"])  # one image, no CFG batch
    # The embedding matters: another w gives other latents.
    other, _ = assert_same_run(ours, theirs, "LCM folder w=2", **{**kwargs, "guidance_scale": 2.0})
    assert (steps[-1] - other[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_loop_over_the_schedule_never_reads_the_schedule_tensor(name):
    """A pipeline's loop hands each scheduler elements of its own `timesteps`, on the GPU where the pipeline runs.
    Reading their values back (`.item()`, `nonzero`) would make the host wait at every step, and a CUDA graph of the
    loop (pare/fast/loop.py) could not hold it: the schedulers read them from a host copy made once. Emulated on
    the CPU: no host read of the schedule's storage after that copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pare.schedulers.scheduling_utils import host_schedule

    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(6)
    host_schedule(scheduler)  # the one read, made before the loop (loop.py primes it so before a capture)
    storage = scheduler.timesteps.untyped_storage().data_ptr()
    reads = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "nonzero", "equal") and any(
                    torch.is_tensor(a) and a.untyped_storage().data_ptr() == storage for a in args):
                reads.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    takes = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in takes else {}
    with Record():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(model_input * 0.1, t, x, **kwargs).prev_sample
    assert reads == []
