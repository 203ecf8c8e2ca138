"""Issue 15's cases, one test each: every bad file, config and argument a new user tried gets one clear error.

Where diffusers runs on (NaN guidance turns CFG off, NaN timesteps give NaN, height=0 means "default"),
the test also shows that it does, so the difference stays deliberate (README: "differs on purpose").
"""

import json
import shutil

import pytest
import torch

import pare
from pare.cli import main
from pare.loading import WeightLoadError

from .checkpoints import build_diffusers_model, make_checkpoint
from .tiny_components import build_diffusers_pipeline, pipeline_folder
from pare.configs import TINY_SD_UNET


@pytest.fixture(scope="module")
def pipe():
    pipe = pare.StableDiffusionPipeline.from_pretrained(pipeline_folder("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def unet_folder(tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(make_checkpoint("unet", TINY_SD_UNET), folder)
    return folder


WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize(("corrupt", "diagnosis"), [
    (lambda b: b[: len(b) // 2], "it is truncated: its tensors need"),
    (lambda b: b[:5], "shorter than the 8-byte header length"),
    (lambda b: b"\xff" * 8 + b[8:], "announce a 18446744073709551615-byte header"),
    (lambda b: b[:8] + b"#" + b[9:], "its header is garbled: not valid JSON"),
])
def test_truncated_or_garbled_safetensors_names_the_file_and_keeps_the_cause(unet_folder, corrupt, diagnosis):
    file = unet_folder / WEIGHTS
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(WeightLoadError) as info:
        pare.UNet2DConditionModel.from_pretrained(unet_folder)
    assert str(file) in str(info.value) and diagnosis in str(info.value)
    assert type(info.value.__cause__).__name__ == "SafetensorError"  # safetensors' own error, kept


@pytest.mark.parametrize(("key", "value", "message"), [
    ("block_out_channels", [32, "x"], "block_out_channels=[32, 'x'], which has entry [1] = 'x', which is a str"),
    ("layers_per_block", -1, "layers_per_block=-1, which is out of range; layers_per_block must be an int in [1, 100]"),
])
def test_config_value_of_wrong_type_or_range_names_file_key_value(unet_folder, key, value, message):
    config = unet_folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    with pytest.raises(ValueError) as info:
        pare.UNet2DConditionModel.from_pretrained(unet_folder)
    assert str(config) in str(info.value) and message in str(info.value)


def test_config_errors_of_the_cli_are_one_line_with_exit_code_1(tmp_path, capsys):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder("tiny-sd"), folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": [32, "x"]}))
    capsys.readouterr()  # drop what building the folder printed
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err  # (transformers may print a progress bar while the text encoder loads)
    errors = [line for line in err.splitlines() if line.startswith("pare generate: error: ")]
    assert len(errors) == 1 and "block_out_channels" in errors[0] and str(config) in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


SMALL = dict(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="np")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(guidance_scale=float("nan")), "`guidance_scale`=nan is not finite"),
    (dict(guidance_scale=float("inf")), "`guidance_scale`=inf is not finite"),
    (dict(guidance_rescale=-0.5), "`guidance_rescale`=-0.5 is out of range; it must be a finite number in [0, 1]"),
    (dict(height=0), "`height`=0 is out of range"),
    (dict(clip_skip=100), "`clip_skip`=100 reaches below the text encoder's first layer"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 31)), "`prompt_embeds` has shape (1, 77, 31); it must be "
                                                              "(batch, tokens, 32)"),
])
def test_bad_pipeline_argument_is_refused_before_any_model_runs(pipe, kwargs, message):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *a: seen.append(1)) for m in (pipe.text_encoder, pipe.unet, pipe.vae)]
    try:
        with pytest.raises(ValueError) as info:
            pipe(**{**SMALL, **kwargs})
    finally:
        for hook in hooks:
            hook.remove()
    assert message in str(info.value)
    assert seen == []


def test_diffusers_runs_on_where_pare_refuses(pipe):
    """The cases above are deliberate differences: diffusers turns CFG off for NaN guidance and takes height=0
    for "the default size", so both return an image; pare refuses them."""
    theirs = build_diffusers_pipeline("tiny-sd")
    theirs.set_progress_bar_config(disable=True)
    out_nan = theirs(**SMALL, guidance_scale=float("nan"), generator=torch.Generator().manual_seed(0)).images
    out_off = theirs(**SMALL, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert (out_nan == out_off).all()  # NaN silently meant "no guidance"
    default = theirs(**{**SMALL, "height": 0}, generator=torch.Generator().manual_seed(0)).images
    assert default.shape[1] == pipe.default_size()  # height=0 silently meant "the default"


def test_nan_timestep_or_conditioning_into_the_unet_is_refused(pipe):
    sample, text = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="`timestep`=nan is not finite"):
        pipe.unet(sample, float("nan"), text)
    with pytest.raises(ValueError, match="`timestep` holds NaN or inf"):
        pipe.unet(sample, torch.tensor([float("inf")]), text)
    with pytest.raises(ValueError, match="`encoder_hidden_states` holds NaN or inf"):
        pipe.unet(sample, 10, torch.full_like(text, float("nan")))
    assert torch.isfinite(pipe.unet(sample, 10, text)).all()
    theirs = build_diffusers_model("unet", TINY_SD_UNET)
    assert torch.isnan(theirs(sample, torch.tensor([float("nan")]), text).sample).all()  # diffusers runs on


def test_out_naming_a_directory_is_a_usage_error(tmp_path, capsys):
    pipeline_folder("tiny-sd")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(pipeline_folder("tiny-sd")), "--prompt", "a", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"pare generate: error: --out {tmp_path} is a directory" in err and "Traceback" not in err


def test_guidance_nan_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(pipeline_folder("tiny-sd")), "--prompt", "a", "--guidance", "nan",
              "--out", str(out)])
    assert info.value.code == 2
    assert "pare generate: error: --guidance must be a finite number, got nan" in capsys.readouterr().err
    assert not out.exists()
