"""A fuzzed boundary: hypothesis corrupts valid configs, weight files, pipeline arguments and images.

The property (issue 15): the call either succeeds and its output is finite, or it raises ValueError,
TypeError or FileNotFoundError whose message names the offending key, argument or file. Any other
exception (IndexError, KeyError, RuntimeError, AttributeError from inside torch, safetensors or PIL)
fails the test, as does a refusal that does not say what was wrong.

    pytest parity_tests/test_errors_fuzz.py                        # CI: the "ci" profile, derandomized
    PARE_FUZZ_EXAMPLES=400 HYPOTHESIS_PROFILE=dev PARE_FUZZ_COUNTS=counts.json \\
        pytest parity_tests/test_errors_fuzz.py                    # the long run behind docs/errors.md

PARE_FUZZ_EXAMPLES sets the examples per test (default: the profile's max_examples times the test's
factor); PARE_FUZZ_COUNTS writes, per input class, how many cases were tried and how each ended.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pare
from pare.configs import TINY_SD_UNET, TINY_VAE

from .checkpoints import make_checkpoint
from .tiny_components import SD_SCHEDULER, pipeline_folder

COUNTS: dict[str, Counter] = defaultdict(Counter)
MESSAGES: dict[str, Counter] = defaultdict(Counter)  # the refusals' messages, numbers masked, per input class


def _write_counts():
    path = os.environ.get("PARE_FUZZ_COUNTS")
    if path and COUNTS:
        report = {k: {**dict(v), "messages": dict(MESSAGES[k].most_common(6))} for k, v in sorted(COUNTS.items())}
        Path(path).write_text(json.dumps(report, indent=2))


atexit.register(_write_counts)


@pytest.fixture(autouse=True)
def _counts_after_each_test():
    yield
    _write_counts()  # also after each test, so that a run stopped by a time limit keeps its counts


def fuzz(factor: int = 1):
    """settings for one fuzz test: the profile's example count (8 in CI) times `factor`, or PARE_FUZZ_EXAMPLES."""
    examples = int(os.environ.get("PARE_FUZZ_EXAMPLES", 0)) or settings().max_examples * factor
    return settings(max_examples=examples, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])


ALLOWED = (ValueError, TypeError, FileNotFoundError)


def check_boundary(input_class: str, call, names: list[str]):
    """Run `call`; its output must be finite, or its error one of ALLOWED and naming one of `names`."""
    COUNTS[input_class]["tried"] += 1
    try:
        out = call()
    except ALLOWED as e:
        message = str(e)
        assert any(str(n) in message for n in names), (
            f"{type(e).__name__} names none of {names}: {message}")
        COUNTS[input_class][f"refused: {type(e).__name__}"] += 1
        MESSAGES[input_class][re.sub(r"/\S+|-?\d[\d.e+-]*", "#", message)[:140]] += 1
        return None
    assert all_finite(out), f"{input_class}: the call succeeded but its output is not finite"
    COUNTS[input_class]["succeeded, finite output"] += 1
    return out


def all_finite(out) -> bool:
    if out is None:
        return True
    if torch.is_tensor(out):
        return bool(torch.isfinite(out).all())
    if isinstance(out, np.ndarray):
        return bool(np.isfinite(out).all())
    if isinstance(out, (list, tuple)):
        return all(all_finite(o) for o in out)
    if hasattr(out, "images"):
        return all_finite(out.images)
    return True


# --- corruptions -----------------------------------------------------------------------------------

BAD_VALUES = st.one_of(
    st.sampled_from([None, True, False, "x", "4", [], [1, "x"], {}, {"a": 1}, 0, -1, 1, 3, 7, 2**20, -2**31,
                     0.0, -0.5, 0.5, 1.5, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]),
    st.integers(-10, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-4, 96), min_size=0, max_size=4),
)


@st.composite
def corrupted_configs(draw, config: dict):
    """(config, names): 1 to 3 keys set to wrong types or out-of-range values, dropped, or unknown keys added."""
    config, names = dict(config), []
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "set", "set", "drop", "extra"]))
        key = draw(st.sampled_from(sorted(config)))
        if action == "set":
            config[key] = draw(BAD_VALUES)
        elif action == "drop":
            del config[key]
        else:
            key = draw(st.sampled_from(["foo", "layers", "block_out_channel", "_name_or_path"]))
            config[key] = draw(BAD_VALUES)
        names.append(key)
    return config, names


def build_and_run_unet(config):
    with torch.device("meta"):
        model = pare.UNet2DConditionModel.from_config(config)
    if sum(p.numel() for p in model.parameters()) > 5_000_000:
        return None  # built; too large to run on the CPU tier
    torch.manual_seed(0)
    model = pare.UNet2DConditionModel.from_config(config).eval()
    c = model.config
    if c.addition_embed_type is not None:
        return None
    cross = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    with torch.no_grad():
        return model(torch.randn(1, c.in_channels, 16, 16), 10, torch.randn(1, 3, cross))


def build_and_run_vae(config):
    with torch.device("meta"):
        model = pare.AutoencoderKL.from_config(config)
    if sum(p.numel() for p in model.parameters()) > 5_000_000:
        return None
    torch.manual_seed(0)
    model = pare.AutoencoderKL.from_config(config).eval()
    c = model.config
    with torch.no_grad():
        return model.decode(torch.randn(1, c.latent_channels, 4, 4))


def build_and_run_scheduler(cls, config):
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(3)
    sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        sample = scheduler.step(0.1 * sample, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    return sample


@fuzz(factor=2)
@given(corrupted_configs(TINY_SD_UNET))
def test_fuzzed_unet_config(case):
    config, names = case
    check_boundary("config: UNet2DConditionModel", lambda: build_and_run_unet(config), names)


@fuzz(factor=4)
@given(corrupted_configs(TINY_VAE))
def test_fuzzed_vae_config(case):
    config, names = case
    check_boundary("config: AutoencoderKL", lambda: build_and_run_vae(config), names)


@fuzz(factor=4)
@given(st.sampled_from(["DDIMScheduler", "DDPMScheduler"]), corrupted_configs(SD_SCHEDULER))
def test_fuzzed_scheduler_config(name, case):
    config, names = case
    # Faults of a pair, named by the key to change: a schedule reaching zero SNR (beta_end = 1) is refused for
    # epsilon-prediction by step() (prediction_type); a schedule too short for the 3 steps asked for, by
    # set_timesteps (num_inference_steps, steps_offset).
    check_boundary(f"config: {name}", lambda: build_and_run_scheduler(getattr(pare, name), config),
                   [*names, "prediction_type", "num_inference_steps"])


@fuzz(factor=2)
@given(corrupted_configs(TINY_SD_UNET))
def test_fuzzed_config_file_names_the_file(case):
    """The same corruptions, written to a config.json: refusals name the file too."""
    config, names = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config))

        def load():
            with torch.device("meta"):
                return pare.UNet2DConditionModel.from_config(folder)

        COUNTS["config file: UNet2DConditionModel"]["tried"] += 1
        try:
            load()
            COUNTS["config file: UNet2DConditionModel"]["succeeded, finite output"] += 1
        except ALLOWED as e:
            assert str(path) in str(e), f"{type(e).__name__} does not name {path}: {e}"
            assert any(n in str(e) for n in names), f"{type(e).__name__} names none of {names}: {e}"
            COUNTS["config file: UNet2DConditionModel"][f"refused: {type(e).__name__}"] += 1


# --- weight files --------------------------------------------------------------------------------

WEIGHTS = "diffusion_pytorch_model.safetensors"


@st.composite
def corrupted_weights(draw):
    """A tiny VAE folder's weights: truncated anywhere, header bytes flipped, or one tensor of a wrong dtype/shape."""
    return draw(st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                            min_size=1, max_size=4)),
        st.tuples(st.just("dtype"), st.integers(0, 10**6),
                  st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.float64,
                                   torch.bfloat16])),
        st.tuples(st.just("shape"), st.integers(0, 10**6), st.lists(st.integers(0, 9), min_size=0, max_size=4)),
        st.tuples(st.just("nonfinite"), st.integers(0, 10**6), st.sampled_from([float("nan"), float("inf")])),
    ))


def corrupt_weights(file: Path, case) -> None:
    from safetensors.torch import load_file, save_file

    data = file.read_bytes()
    kind = case[0]
    if kind == "truncate":
        file.write_bytes(data[: int(case[1] * len(data))])
    elif kind == "flip":
        header_end = 8 + int.from_bytes(data[:8], "little")
        data = bytearray(data)
        for where, mask in case[1]:
            data[int(where * header_end)] ^= mask
        file.write_bytes(bytes(data))
    else:
        tensors = {k: v.clone() for k, v in load_file(str(file)).items()}
        key = sorted(tensors)[case[1] % len(tensors)]
        if kind == "dtype":
            tensors[key] = tensors[key].to(case[2])
        elif kind == "shape":
            tensors[key] = torch.zeros(case[2])
        else:
            tensors[key] = tensors[key].clone().fill_(case[2])
        save_file(tensors, str(file))


@fuzz(factor=2)
@given(corrupted_weights())
def test_fuzzed_weight_file(case):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vae"
        shutil.copytree(make_checkpoint("vae", TINY_VAE), folder)
        file = folder / WEIGHTS
        corrupt_weights(file, case)

        def load_and_decode():
            vae = pare.AutoencoderKL.from_pretrained(folder)
            with torch.no_grad():
                return vae.decode(torch.zeros(1, vae.config.latent_channels, 4, 4))

        check_boundary(f"weights: {case[0]}", load_and_decode, [str(file), str(folder)])


# --- pipeline arguments --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def pipelines():
    txt2img = pare.StableDiffusionPipeline.from_pretrained(pipeline_folder("tiny-sd"))
    img2img = pare.StableDiffusionImg2ImgPipeline(**txt2img.components)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img


NUMBER_VALUES = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1, -0.5, 0, 0.0, 0.5, 1, 1.0, 2, 7.5,
                                 1e6, 1e30, -1e30, True, "1", None, [1.0], torch.tensor(2.0)])
# Counts and sizes get no "huge" values: a 10**9-step or 10**6-pixel request is a slow or out-of-memory run,
# not a wrong argument.
COUNT_VALUES = st.sampled_from([float("nan"), -1, 0, 1, 2, 1.5, 2.0, True, "2", None, [2]])
SIZE_VALUES = st.sampled_from([float("nan"), -16, 0, 7, 8, 12, 16, 24, 16.0, True, "16", [16]])
NUMBERS = {"guidance_scale": NUMBER_VALUES, "guidance_rescale": NUMBER_VALUES, "eta": NUMBER_VALUES,
           "strength": NUMBER_VALUES, "num_inference_steps": COUNT_VALUES, "num_images_per_prompt": COUNT_VALUES,
           "clip_skip": st.sampled_from([float("nan"), -1, 0, 1, 2, 3, 4, 100, 1.0, True, "1"]),
           "height": SIZE_VALUES, "width": SIZE_VALUES}


def embeds(batch: int, width: int = 32, fill: float | None = None) -> torch.Tensor:
    x = torch.randn(batch, 77, width, generator=torch.Generator().manual_seed(batch))
    return x.fill_(fill) if fill is not None else x


# Mismatched batches and ill-fitting tensors: (name, kwargs, names the error may give).
BATCH_CASES = {
    "generators for another batch": (dict(prompt=["a", "b"], generator=[torch.Generator()] * 3), ["generator"]),
    "negative prompts for another batch": (dict(prompt=["a", "b"], negative_prompt=["c"] * 3), ["negative_prompt"]),
    "embeds of different batches": (dict(prompt=None, prompt_embeds=embeds(2), negative_prompt_embeds=embeds(1)),
                                    ["prompt_embeds"]),
    "embeds too wide": (dict(prompt=None, prompt_embeds=embeds(1, 33)), ["prompt_embeds"]),
    "embeds 2-d": (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), ["prompt_embeds"]),
    "embeds NaN": (dict(prompt=None, prompt_embeds=embeds(1, fill=float("nan"))), ["prompt_embeds"]),
    "embeds int": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32, dtype=torch.int64)), ["prompt_embeds"]),
    "latents of another batch": (dict(prompt=["a", "b"], latents=torch.zeros(1, 4, 8, 8)), ["latents"]),
    "latents inf": (dict(latents=torch.full((1, 4, 8, 8), float("inf"))), ["latents"]),
    "prompt not text": (dict(prompt=3), ["prompt"]),
    "prompts not text": (dict(prompt=["a", 3]), ["prompt"]),
}


@st.composite
def bad_arguments(draw):
    """(kwargs, names): 1 or 2 numeric arguments set to bad values, or one mismatched batch."""
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(BATCH_CASES)))
        kwargs, names = BATCH_CASES[name]
        return dict(kwargs), names, f"pipeline: {name}"
    chosen = draw(st.lists(st.sampled_from(sorted(NUMBERS)), min_size=1, max_size=2, unique=True))
    return {n: draw(NUMBERS[n]) for n in chosen}, chosen, "pipeline: numeric arguments"


@fuzz(factor=2)
@given(bad_arguments(), st.booleans())
def test_fuzzed_pipeline_arguments(case, img2img):
    kwargs, names, input_class = case
    txt2img, i2i = pipelines()
    base = dict(prompt="a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    if img2img:
        pipe, base = i2i, {**base, "image": torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
        kwargs.pop("height", None), kwargs.pop("width", None), kwargs.pop("latents", None)
    else:
        pipe, base = txt2img, {**base, "height": 16, "width": 16}
        kwargs.pop("strength", None)
    if not kwargs:
        return
    if isinstance(kwargs.get("generator"), list) or kwargs.get("num_images_per_prompt") not in (None, 1):
        base.pop("generator")
    check_boundary(input_class, lambda: pipe(**{**base, **kwargs}), names)


# --- images --------------------------------------------------------------------------------------


@st.composite
def images(draw):
    """Images a user may pass to img2img: odd PIL modes, 16-bit, 1x1, odd sizes, arrays of the wrong kind."""
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["pil", "pil", "numpy", "tensor"]))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    if kind == "pil":
        mode = draw(st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "I", "F"]))
        base = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        if mode == "I;16":  # 16-bit grey, as a PNG from a scanner or a depth map comes in
            return PIL.Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)), f"image: PIL {mode}"
        return base.convert(mode), f"image: PIL {mode}"
    channels = draw(st.sampled_from([1, 3, 4]))
    dtype = draw(st.sampled_from(["float32", "float64", "uint8", "float16"]))
    array = rng.random((h, w, channels)) if dtype != "uint8" else rng.integers(0, 256, (h, w, channels))
    array = array.astype(dtype)
    if draw(st.integers(0, 5)) == 0:
        array[0, 0, 0] = np.nan if dtype != "uint8" else 0
    if kind == "numpy":
        if draw(st.booleans()):
            array = array[..., 0]  # (H, W)
        return array, f"image: numpy {dtype}"
    tensor = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)
    return tensor, f"image: torch {dtype}"


@fuzz(factor=2)
@given(images())
def test_fuzzed_img2img_image(case):
    image, input_class = case
    _, pipe = pipelines()
    call = lambda: pipe(prompt="a cat", image=image, strength=0.5, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0))
    out = check_boundary(input_class, call, ["image"])
    if out is not None and isinstance(image, PIL.Image.Image):
        side = lambda s: s - s % pipe.vae_scale_factor
        assert out.images.shape[1:3] == (side(image.height), side(image.width))  # cut down, as diffusers does
