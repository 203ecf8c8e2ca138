"""pare.UNet2DConditionModel against diffusers' UNet2DConditionModel: weights, configs, inputs, end to end.

The tiny configs (SD 1.x, SD 2.x, SDXL, inpainting, LCM) run on the CPU; the official SD1.5,
SD2.1 and SDXL configs at their native latent sizes are the GPU tier (`--device cuda`).
"""

import copy
import inspect
import json
import logging
import shutil

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pare import UNet2DConditionModel, WeightLoadError
from pare.configs import SDXL_UNET, TINY_SD_UNET, TINY_SDXL_UNET, UNET_CONFIGS
from pare.parity import assert_parity
from pare.parity.blocks import compare_blocks
from parity_tests.checkpoints import build_diffusers_model, make_checkpoint
from parity_tests.harness import cast, check_block, fast_if_asked
from parity_tests.strategies import seeds

TINY = ["tiny-sd", "tiny-sd2", "tiny-sdxl", "tiny-sd-inpaint", "tiny-lcm"]
OFFICIAL = ["sd15", "sd15-inpaint", "sd21", "sdxl"]
TEXT_TOKENS = 7  # any length works; CLIP's 77 in the official tier


def unet_inputs(config: dict, batch: int, height: int, width: int, seed: int = 0, timestep=981,
                tokens: int = TEXT_TOKENS, device="cpu"):
    """(args, kwargs) of one UNet call, as a pipeline makes them: latents, t, text, and what the family needs."""
    g = torch.Generator(device).manual_seed(seed)
    text_dim = config["cross_attention_dim"]
    text_dim = text_dim if isinstance(text_dim, int) else text_dim[0]  # given per block: one text encoder still
    args = (torch.randn(batch, config["in_channels"], height, width, generator=g, device=device),
            torch.tensor(timestep, device=device),
            torch.randn(batch, tokens, text_dim, generator=g, device=device))
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        # (original size, crop top-left, target size) in pixels, as SDXL pipelines pass them
        time_ids = torch.tensor([[8 * height, 8 * width, 0, 0, 8 * height, 8 * width]] * batch, device=device)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g, device=device),
                                       "time_ids": time_ids.float()}
    if config.get("time_cond_proj_dim") is not None:
        kwargs["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"], generator=g, device=device)
    return args, kwargs


def twins(name_or_config, seed: int = 0):
    """(pare, diffusers) UNets with the same (diffusers' seeded random) weights, in eval mode, on the CPU."""
    config = UNET_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    theirs = build_diffusers_model("unet", config, seed)
    ours = UNet2DConditionModel.from_config(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
@settings(max_examples=3)
@given(batch=st.integers(1, 2), height=st.integers(3, 19), width=st.integers(3, 19), timestep=st.integers(0, 999),
       seed=seeds)
def test_tiny_unet_matches_diffusers_end_to_end(device, dtype, name, batch, height, width, timestep, seed):
    # Odd sizes too: the UNet then forwards the skips' sizes to its upsamplers.
    config = UNET_CONFIGS[name]
    theirs = build_diffusers_model("unet", config, seed)
    args, kwargs = unet_inputs(config, batch, height, width, seed, timestep)
    check_block(f"{name} UNet {height}x{width}", UNet2DConditionModel.from_config(config), theirs, args, kwargs,
                dtype=dtype, device=device, scope="end_to_end")


# Options no official checkpoint sets but diffusers honours for SD's block types: pare must honour them alike.
CONFIG_VARIANTS = {
    "scale_shift resnets": {"resnet_time_scale_shift": "scale_shift"},
    "time embedding options": {"time_embedding_dim": 48, "time_embedding_act_fn": "silu", "timestep_post_act": "gelu"},
    "kernels, centring, padding": {"conv_in_kernel": 5, "conv_out_kernel": 1, "center_input_sample": True,
                                   "downsample_padding": 0, "mid_block_scale_factor": 2.0},
    "per-block lists": {"layers_per_block": [2, 1], "cross_attention_dim": [32, 32], "attention_head_dim": [4, 2]},
    "per-layer transformer depths": {"transformer_layers_per_block": [[1], [2]],
                                     "reverse_transformer_layers_per_block": [[2, 1], [1, 3]]},
    "no mid block": {"mid_block_type": None},
    "3 stages": {"block_out_channels": [16, 32, 32], "layers_per_block": 1,
                 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_options_match_diffusers(device, dtype, variant):
    config = {**TINY_SD_UNET, **CONFIG_VARIANTS[variant]}
    args, kwargs = unet_inputs(config, 2, 11, 9)  # odd: with 3 stages both sizes need forwarding
    check_block(f"tiny-sd UNet, {variant}", UNet2DConditionModel.from_config(config),
                build_diffusers_model("unet", config), args, kwargs, dtype=dtype, device=device, scope="end_to_end")


def test_unet_with_text_padding_mask_matches_diffusers(device, dtype):
    config = UNET_CONFIGS["tiny-sd"]
    args, kwargs = unet_inputs(config, 2, 8, 8)
    mask = torch.ones(2, TEXT_TOKENS)
    mask[1, 4:] = 0  # the second prompt is shorter
    check_block("tiny-sd UNet, text mask", UNet2DConditionModel.from_config(config),
                build_diffusers_model("unet", config), args, {**kwargs, "encoder_attention_mask": mask},
                dtype=dtype, device=device, scope="end_to_end")


@pytest.mark.official
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_unet_matches_diffusers_end_to_end(device, dtype, name):
    """The official config at its native latent size, batch 2 (a CFG batch), 77 text tokens, built on the device.

    On failure, the per-block comparison names the first block that left the budget.
    """
    config = UNET_CONFIGS[name]
    side = config["sample_size"]
    theirs = build_diffusers_model("unet", config, device=device)
    with torch.device(device):
        ours = UNet2DConditionModel.from_config(config)
    args, kwargs = unet_inputs(config, 2, side, side, tokens=77, device=device)
    try:
        check_block(f"{name} UNet {side}x{side}", ours, theirs, args, kwargs, dtype=dtype, device=device,
                    scope="end_to_end")
    except AssertionError as failure:
        exact = copy.deepcopy(theirs).double() if dtype in (torch.float16, torch.bfloat16) else None
        blocks = compare_blocks(ours, theirs, cast(args, dtype, device), cast(kwargs, dtype, device),
                                reference64=exact)
        raise AssertionError(f"{failure}\n\nblock by block:\n{blocks}") from None
    finally:
        del ours, theirs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@pytest.mark.official
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_unet_every_block_within_budget(device, dtype, name):
    """Every block of the official UNet (hooked by name in both models), judged like the whole model."""
    config = UNET_CONFIGS[name]
    side = config["sample_size"]
    theirs = build_diffusers_model("unet", config, device=device, dtype=dtype)
    with torch.device(device):
        ours = UNet2DConditionModel.from_config(config).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fast_if_asked(ours)
    exact = copy.deepcopy(theirs).double() if dtype in (torch.float16, torch.bfloat16) else None
    args, kwargs = unet_inputs(config, 2, side, side, tokens=77, device=device)
    try:
        blocks = compare_blocks(ours, theirs, cast(args, dtype, device), cast(kwargs, dtype, device),
                                reference64=exact)
        assert blocks.first_failure is None, str(blocks)
        assert len(blocks.rows) > 70  # every stage, ResNet, transformer and resampler was hooked
    finally:
        del ours, theirs, exact
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- loading official-format checkpoints ----------------------------------------------------------


def assert_same_weights(ours, theirs):
    theirs = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_from_pretrained_loads_a_diffusers_written_checkpoint(name):
    folder = make_checkpoint("unet", UNET_CONFIGS[name])
    ours = UNet2DConditionModel.from_pretrained(folder)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    assert not ours.training and ours.config.in_channels == theirs.config.in_channels
    assert_same_weights(ours, theirs)
    args, kwargs = unet_inputs(UNET_CONFIGS[name], 2, 8, 8)
    with torch.no_grad():
        assert_parity(f"{name} from_pretrained", ours(*args, **kwargs), theirs(*args, **kwargs).sample,
                      scope="end_to_end")


def test_from_pretrained_reads_the_fp16_variant():
    folder = make_checkpoint("unet", TINY_SD_UNET, variant="fp16")
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ours = UNet2DConditionModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert ours.dtype == torch.float16
    assert_same_weights(ours, theirs)


def test_from_pretrained_reads_shards_in_a_hub_snapshot_layout(tmp_path):
    folder = make_checkpoint("unet", TINY_SDXL_UNET, max_shard_size="200KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    shutil.copytree(folder, tmp_path / "unet")  # a local folder laid out like a Hub snapshot: <repo>/unet/...
    (tmp_path / "model_index.json").write_text("{}")
    ours = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert_same_weights(ours, diffusers.UNet2DConditionModel.from_pretrained(folder))


def test_from_pretrained_is_strict_and_names_keys_and_file(tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(make_checkpoint("unet", TINY_SD_UNET), folder)
    config = json.loads((folder / "config.json").read_text())
    config["cross_attention_dim"] = 16  # the checkpoint's to_k / to_v were made for 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError) as error:
        UNet2DConditionModel.from_pretrained(folder)
    message = str(error.value)
    assert "diffusion_pytorch_model.safetensors" in message and "mis-shaped" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in message


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sd15-inpaint", "lcm-sd15"])
def test_official_configs_have_diffusers_parameter_names_and_shapes(name):
    # Built on the meta device: shapes without memory, so the official sizes are checked on any machine.
    config = UNET_CONFIGS[name]
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config({k: v for k, v in config.items() if k[0] != "_"})
        ours = UNet2DConditionModel.from_config(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# --- timesteps and inputs -------------------------------------------------------------------------


def test_timestep_forms_agree_with_each_other_and_with_diffusers():
    ours, theirs = twins("tiny-sd")
    (sample, _, text), _ = unet_inputs(TINY_SD_UNET, 2, 8, 8)
    with torch.no_grad():
        expected = ours(sample, torch.tensor([500, 500]), text)
        for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor(500.0), torch.tensor([500.0])):
            assert torch.equal(ours(sample, t, text), expected), t
        for t in (499.5, torch.tensor([10, 900]), torch.tensor(250)):  # fractional, per-sample, 0-d
            assert_parity(f"timestep {t}", ours(sample, t, text), theirs(sample, t, text).sample, scope="end_to_end")


def sdxl_call(batch=2, **change):
    args, kwargs = unet_inputs(TINY_SDXL_UNET, batch, 8, 8)
    return args, {**kwargs, **change}


BAD_INPUTS = {
    "3-d sample": (lambda a, k: ((a[0][0], *a[1:]), k), r"sample must be \(B, 4, H, W\)"),
    "wrong channels": (lambda a, k: ((a[0][:, :3], *a[1:]), k), r"in_channels=4.*got shape \(2, 3, 8, 8\)"),
    "timestep (2, 1)": (lambda a, k: ((a[0], torch.ones(2, 1), a[2]), k), r"timestep must be .*got shape \(2, 1\)"),
    "timestep (3,)": (lambda a, k: ((a[0], torch.ones(3), a[2]), k), r"\(B,\) = \(2,\), got shape \(3,\)"),
    "text batch": (lambda a, k: ((*a[:2], a[2][:1]), k), r"encoder_hidden_states must be .*\(2, M, 64\).*got \(1, 7, 64\)"),
    "text width": (lambda a, k: ((*a[:2], a[2][..., :8]), k), r"got \(2, 7, 8\)"),
    "no added_cond_kwargs": (lambda a, k: (a, {}), r"needs added_cond_kwargs\['text_embeds'\]"),
    "no time_ids": (lambda a, k: (a, {"added_cond_kwargs": {"text_embeds": k["added_cond_kwargs"]["text_embeds"]}}),
                    r"needs added_cond_kwargs\['time_ids'\]"),
    "pooled width": (lambda a, k: (a, {"added_cond_kwargs": {**k["added_cond_kwargs"], "text_embeds": torch.ones(2, 5)}}),
                     r"text_embeds \(2, 5\).*= projection_class_embeddings_input_dim \(80\)"),
    "timestep_cond without LCM": (lambda a, k: (a, {**k, "timestep_cond": torch.ones(2, 4)}), r"no time_cond_proj_dim"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_errors_that_say_what_was_expected(case):
    change, message = BAD_INPUTS[case]
    model = UNet2DConditionModel.from_config(TINY_SDXL_UNET)
    args, kwargs = change(*sdxl_call())
    with pytest.raises(ValueError, match=message):
        model(*args, **kwargs)


# --- configs ------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-2-1 unet/config.json, as published (diffusers 0.10 era: keys later versions dropped
# from their defaults, and `_` metadata).
SD21_CHECKPOINT_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}


@pytest.mark.parametrize("config", [SD21_CHECKPOINT_CONFIG, SDXL_UNET], ids=["sd21", "sdxl"])
def test_real_checkpoint_configs_load_with_every_key_they_carry(config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(tmp_path)
    assert model.config.cross_attention_dim == config["cross_attention_dim"]
    # the heads quirk: attention_head_dim is the head count; SD2.1 and SDXL heads are 64 wide
    attn = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.inner_dim // attn.heads) == (10, 64)


def test_every_diffusers_config_key_is_accepted_or_refused_by_name():
    theirs = set(inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters) - {"self"}
    ours = set(UNet2DConditionModel.config_keys())
    assert theirs == ours | set(UNet2DConditionModel.unsupported_config), theirs ^ (ours | set(UNet2DConditionModel.unsupported_config))
    # ... and the one value pare accepts for an unsupported key is diffusers' default
    defaults = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    assert {k: defaults[k].default for k in UNet2DConditionModel.unsupported_config} == UNet2DConditionModel.unsupported_config


@pytest.mark.parametrize("name", TINY)
def test_diffusers_resolved_config_builds_the_same_model(name):
    # diffusers' model.config lists every key with its resolved value, the way save_pretrained writes it.
    _, theirs = twins(name)
    ours = UNet2DConditionModel.from_config(dict(theirs.config))
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_unknown_keys_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pare"):
        UNet2DConditionModel.from_config({**TINY_SD_UNET, "use_xformers": True})
    assert "use_xformers" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]},
     r"down_block_types names a down block 'AttnDownBlock2D'.*\('CrossAttnDownBlock2D', 'DownBlock2D'\)"),
    ({"up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]}, r"up block 'SimpleCrossAttnUpBlock2D'"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, r"mid block 'UNetMidBlock2DSimpleCrossAttn'"),
    ({"class_embed_type": "projection"}, r"class_embed_type='projection' .* needs projection_class_embeddings_input_dim"),
    ({"class_embeddings_concat": True}, r"class_embeddings_concat=True, which pare does not implement"),
    ({"dual_cross_attention": True}, r"dual_cross_attention=True"),
    ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier'"),
    ({"encoder_hid_dim": 768, "encoder_hid_dim_type": "image_proj"},
     r"encoder_hid_dim_type='image_proj' is not implemented.*\(None, 'text_proj'\)"),
    ({"encoder_hid_dim_type": "text_proj"}, r"needs encoder_hid_dim"),
    ({"addition_embed_type": "text"}, r"addition_embed_type='text' is not implemented.*\(None, 'text_time'\)"),
    ({"num_attention_heads": 8}, r"num_attention_heads=8: .*set attention_head_dim"),
    ({"only_cross_attention": [True, False, True]}, r"only_cross_attention=\[True, False, True\] has 3 entries"),
    ({"attention_head_dim": [8, 8, 8]}, r"attention_head_dim=\[8, 8, 8\] has 3 entries, but there are 2 down blocks"),
    ({"transformer_layers_per_block": [[1], [2]]}, r"set reverse_transformer_layers_per_block too"),
    ({"addition_embed_type": "text_time"}, r"'text_time' \(SDXL\) needs addition_time_embed_dim"),
    ({"norm_num_groups": None}, r"norm_num_groups must be a number"),
])
def test_unsupported_options_raise_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        UNet2DConditionModel.from_config({**TINY_SD_UNET, **change})
