"""pare.ControlNetModel and MultiControlNetModel against diffusers': block by block, end to end, loading.

The ControlNets have the published configs' structure (SD1.5 canny/depth, diffusers'
controlnet-canny-sdxl-1.0), tiny for the CPU and official in the GPU tier, with random zero
convolutions (`pare.parity.controlnet_checkpoint`), since zero ones would make every residual 0.
"""

import copy
import json

import diffusers
import pytest
import torch

from pare import ControlNetModel, MultiControlNetModel, UNet2DConditionModel
from pare.configs import CONTROLNET_CONFIGS, TINY_SD_UNET, UNET_CONFIGS
from pare.parity.controlnet_checkpoint import make_controlnet_checkpoint, reference_controlnet
from pare.parity import assert_parity
from pare.parity.blocks import compare_blocks
from parity_tests.checkpoints import build_diffusers_model
from parity_tests.harness import cast, check_block, fast_if_asked
from parity_tests.test_unet import unet_inputs

UNET_OF = {"tiny-sd": "tiny-sd", "tiny-sdxl": "tiny-sdxl", "sd15": "sd15", "sdxl": "sdxl"}


def controlnet_inputs(name: str, batch: int = 2, height: int = 4, width: int = 6, seed: int = 0, tokens: int = 7,
                      device="cpu"):
    """(args, kwargs) of one ControlNet call: the UNet's inputs plus a condition image 8x the latents' size."""
    config = CONTROLNET_CONFIGS[name]
    args, kwargs = unet_inputs(UNET_CONFIGS[UNET_OF[name]], batch, height, width, seed, tokens=tokens, device=device)
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    g = torch.Generator(device).manual_seed(seed + 7)
    image = torch.rand(batch, 3, factor * height, factor * width, generator=g, device=device)
    return (*args, image), kwargs


def residuals(out) -> torch.Tensor:
    """Every residual of a ControlNet output (pare's named tuple or diffusers' ControlNetOutput), flattened."""
    return torch.cat([t.flatten() for t in [*out.down_block_res_samples, out.mid_block_res_sample]])


def twins(name: str, seed: int = 0, **change):
    theirs = reference_controlnet(diffusers, {**CONTROLNET_CONFIGS[name], **change}, seed)
    ours = ControlNetModel.from_config({**CONTROLNET_CONFIGS[name], **change}).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


CASES = {
    "plain": ({}, {}),
    "scale 0.6": ({}, {"conditioning_scale": 0.6}),
    "guess mode": ({}, {"guess_mode": True, "conditioning_scale": 0.8}),
    "bgr, global pooling, class labels": ({"controlnet_conditioning_channel_order": "bgr",
                                           "global_pool_conditions": True, "num_class_embeds": 10},
                                          {"class_labels": torch.tensor([3, 7])}),
}


# The options are the same code for both families: SDXL runs the plain case (guess mode: in its pipeline test).
@pytest.mark.parametrize("name, case", [("tiny-sd", case) for case in CASES] + [("tiny-sdxl", "plain")])
def test_tiny_controlnet_matches_diffusers(device, dtype, name, case):
    change, extra = CASES[case]
    config = {**CONTROLNET_CONFIGS[name], **change}
    args, kwargs = controlnet_inputs(name)
    check_block(f"{name} ControlNet, {case}", ControlNetModel.from_config(config),
                reference_controlnet(diffusers, config), args, {**kwargs, **extra}, dtype=dtype, device=device,
                scope="end_to_end", output=residuals)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_tiny_controlnet_every_block_matches_diffusers(name):
    ours, theirs = twins(name)
    args, kwargs = controlnet_inputs(name, height=5, width=3)  # odd sizes: the downsamplers round up
    blocks = compare_blocks(ours, theirs, args, {**kwargs, "return_dict": False})
    assert blocks.first_failure is None, str(blocks)
    names = [r.name for r in blocks.rows]
    assert "controlnet_cond_embedding" in names and "controlnet_mid_block" in names and "mid_block" in names
    assert any(".attentions." in n for n in names) and len(names) > 15


@pytest.mark.official
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_official_controlnet_matches_diffusers_block_by_block(device, dtype, name):
    """The published architecture at its native size (SD1.5 64x64 latents, SDXL 128x128), batch 2, 77 tokens."""
    side = UNET_CONFIGS[name]["sample_size"]
    theirs = reference_controlnet(diffusers, name, device=device, dtype=dtype)
    with torch.device(device):
        ours = ControlNetModel.from_config(CONTROLNET_CONFIGS[name]).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fast_if_asked(ours)
    exact = copy.deepcopy(theirs).double() if dtype in (torch.float16, torch.bfloat16) else None
    args, kwargs = controlnet_inputs(name, 2, side, side, tokens=77, device=device)
    args, kwargs = cast(args, dtype, device), {**cast(kwargs, dtype, device), "return_dict": False}
    try:
        blocks = compare_blocks(ours, theirs, args, kwargs, reference64=exact)
        assert blocks.first_failure is None, str(blocks)
        with torch.no_grad():
            ours_out, theirs_out = ours(*args, **kwargs), theirs(*args, **kwargs)
            ref = None if exact is None else exact(*cast(args, torch.float64, device),
                                                   **cast(kwargs, torch.float64, device))
        for i, (a, b) in enumerate(zip(ours_out[0], theirs_out[0])):
            assert_parity(f"{name} ControlNet down residual {i}", a, b, None if ref is None else ref[0][i],
                          dtype=dtype, scope="end_to_end")
        assert_parity(f"{name} ControlNet mid residual", ours_out[1], theirs_out[1],
                      None if ref is None else ref[1], dtype=dtype, scope="end_to_end")
    finally:
        del ours, theirs, exact
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_published_controlnet_configs_have_diffusers_names_and_shapes(name):
    config = CONTROLNET_CONFIGS[name]
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config({k: v for k, v in config.items() if k[0] != "_"})
        ours = ControlNetModel.from_config(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_multi_controlnet_sums_residuals_as_diffusers_does():
    first, first_ref = twins("tiny-sd", seed=0)
    second, second_ref = twins("tiny-sd", seed=1)
    ours = MultiControlNetModel([first, second])
    theirs = diffusers.models.controlnets.MultiControlNetModel([first_ref, second_ref])
    (sample, t, text, image), _ = controlnet_inputs("tiny-sd")
    images = [image, image.flip(-1)]
    with torch.no_grad():
        mine = ours(sample, t, text, images, [0.5, 1.2])
        ref = theirs(sample, t, text, images, [0.5, 1.2], return_dict=False)
    assert_parity("tiny-sd MultiControlNet", residuals(mine), torch.cat(
        [x.flatten() for x in [*ref[0], ref[1]]]), scope="end_to_end")
    with pytest.raises(ValueError, match=r"2 ControlNets need as many condition images and scales"):
        ours(sample, t, text, images[:1], [1.0])


# --- with the UNet ------------------------------------------------------------------------------


@torch.no_grad()
def test_unet_with_controlnet_residuals_matches_diffusers():
    net, net_ref = twins("tiny-sd")
    unet_ref = build_diffusers_model("unet", TINY_SD_UNET)
    unet = UNet2DConditionModel.from_config(TINY_SD_UNET).eval()
    unet.load_state_dict(unet_ref.state_dict())
    (sample, t, text, image), _ = controlnet_inputs("tiny-sd")
    down, mid = net(sample, t, text, image, 0.9)
    down_ref, mid_ref = net_ref(sample, t, text, image, 0.9, return_dict=False)
    ours = unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    theirs = unet_ref(sample, t, text, down_block_additional_residuals=down_ref,
                      mid_block_additional_residual=mid_ref).sample
    assert_parity("tiny-sd UNet + ControlNet", ours, theirs, scope="end_to_end")
    assert not torch.allclose(ours, unet(sample, t, text))


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_from_pretrained_loads_a_diffusers_written_controlnet(tmp_path, name):
    folder = make_controlnet_checkpoint(diffusers, tmp_path / "controlnet", name)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ControlNetModel"
    ours = ControlNetModel.from_pretrained(folder)
    theirs = diffusers.ControlNetModel.from_pretrained(folder).eval()
    theirs_state = theirs.state_dict()
    assert all(torch.equal(v, theirs_state[k]) for k, v in ours.state_dict().items())
    args, kwargs = controlnet_inputs(name)
    with torch.no_grad():
        assert_parity(f"{name} ControlNet from_pretrained", residuals(ours(*args, **kwargs)),
                      residuals(theirs(*args, **kwargs)), scope="end_to_end")


@pytest.mark.parametrize("unet_name", ["tiny-sd", "tiny-sdxl"])
def test_from_unet_copies_the_unet_as_diffusers_does(unet_name):
    unet_ref = build_diffusers_model("unet", UNET_CONFIGS[unet_name])
    unet = UNet2DConditionModel.from_config(UNET_CONFIGS[unet_name]).eval()
    unet.load_state_dict(unet_ref.state_dict())
    ours = ControlNetModel.from_unet(unet)
    theirs = diffusers.ControlNetModel.from_unet(unet_ref)
    theirs_state = theirs.state_dict()
    assert ours.state_dict().keys() == theirs_state.keys()
    copied = [k for k in theirs_state if not k.startswith(("controlnet_", "controlnet_cond_embedding"))]
    assert all(torch.equal(ours.state_dict()[k], theirs_state[k]) for k in copied)
    zero = [k for k in theirs_state if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert all(not ours.state_dict()[k].any() for k in zero)  # zero convs: the UNet starts unchanged


def test_a_condition_image_of_the_wrong_size_says_what_it_must_be():
    ours, _ = twins("tiny-sd")
    (sample, t, text, image), _ = controlnet_inputs("tiny-sd")
    with pytest.raises(ValueError, match=r"controlnet_cond must be .*\(2, 3, 32, 48\).*got \(2, 3, 16, 24\)"):
        ours(sample, t, text, image[..., ::2, ::2])


@pytest.mark.parametrize("change, message", [
    ({"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 4}, r"simple_projection"),
    ({"controlnet_conditioning_channel_order": "rbg"}, r"'rbg'; expected one of \('rgb', 'bgr'\)"),
    ({"layers_per_block": [1, 2]}, r"layers_per_block=\[1, 2\]: a ControlNet takes one count"),
    ({"encoder_hid_dim": 8}, r"encoder_hid_dim=8, which pare does not implement"),
])
def test_unsupported_controlnet_options_raise_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        ControlNetModel.from_config({**CONTROLNET_CONFIGS["tiny-sd"], **change})


# --- the builders that `pare parity` and `pare bench` call ------------------------------------------


def test_controlnet_rows_and_step_builders_run_and_agree():
    from pare.parity.controlnet_checkpoint import controlnet_rows, controlnet_step

    rows = controlnet_rows(diffusers, "tiny-sd", side=4)
    assert rows and all(r.passed for r in rows) and rows[-1].name == "ControlNetModel"
    ours, theirs, call_ours, call_theirs = controlnet_step(diffusers, "tiny")
    with torch.no_grad():
        assert_parity("tiny ControlNet step", call_ours(ours), call_theirs(theirs), scope="end_to_end")


def test_every_diffusers_controlnet_config_key_is_accepted_or_refused_by_name():
    import inspect

    theirs = inspect.signature(diffusers.ControlNetModel.__init__).parameters
    ours = set(ControlNetModel.config_keys()) | set(ControlNetModel.unsupported_config)
    assert set(theirs) - {"self"} == ours
    # the defaults are diffusers' (tuples and lists alike)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    pare_defaults = inspect.signature(ControlNetModel.__init__).parameters
    assert {k: norm(pare_defaults[k].default) for k in ControlNetModel.config_keys()} == {
        k: norm(theirs[k].default) for k in ControlNetModel.config_keys()}
    assert {k: theirs[k].default for k in ControlNetModel.unsupported_config} == ControlNetModel.unsupported_config
