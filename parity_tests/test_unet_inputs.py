"""The UNet inputs that users add around SD's path, each against diffusers' UNet2DConditionModel.

class labels (every class_embed_type, and the SD2 x4 upscaler's num_class_embeds), Kolors' text
projection, attention masks, the LoRA scale of cross_attention_kwargs, ControlNet's residuals and
T2I-Adapter's. The official configs that needed them (x4 upscaler, Kolors) are checked for
diffusers' parameter names and shapes on the meta device, and end to end in the GPU tier.
"""

import copy

import diffusers
import pytest
import torch

from pare import UNet2DConditionModel
from pare.configs import TINY_SD_UNET, UNET_CONFIGS
from pare.parity import assert_parity
from parity_tests.checkpoints import build_diffusers_model
from parity_tests.harness import cast, check_block
from parity_tests.test_unet import TEXT_TOKENS, twins, unet_inputs


def inputs(config: dict, batch: int = 2, height: int = 8, width: int = 8, seed: int = 0, device="cpu", tokens=None):
    """unet_inputs, plus what the config asks for: class labels, text as wide as encoder_hid_dim."""
    tokens = tokens or TEXT_TOKENS
    (sample, t, text), kwargs = unet_inputs(config, batch, height, width, seed, tokens=tokens, device=device)
    g = torch.Generator(device).manual_seed(seed + 1)
    if config.get("encoder_hid_dim") is not None:
        text = torch.randn(batch, tokens, config["encoder_hid_dim"], generator=g, device=device)
    kind, time_dim = config.get("class_embed_type"), 4 * config["block_out_channels"][0]
    if kind is None and config.get("num_class_embeds") is not None:
        kwargs["class_labels"] = torch.randint(0, config["num_class_embeds"], (batch,), generator=g, device=device)
    elif kind == "timestep":
        kwargs["class_labels"] = torch.randint(0, 1000, (batch,), generator=g, device=device)
    elif kind == "identity":
        kwargs["class_labels"] = torch.randn(batch, time_dim, generator=g, device=device)
    elif kind in ("projection", "simple_projection"):
        kwargs["class_labels"] = torch.randn(batch, config["projection_class_embeddings_input_dim"], generator=g,
                                             device=device)
    return (sample, t, text), kwargs


# --- class labels and text projection -------------------------------------------------------------

CLASS_CONFIGS = {
    "num_class_embeds": {"num_class_embeds": 10},
    "timestep": {"class_embed_type": "timestep"},
    "identity": {"class_embed_type": "identity"},
    "projection": {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 12},
    "simple_projection": {"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 12},
}


@pytest.mark.parametrize("kind", CLASS_CONFIGS)
def test_class_labels_match_diffusers(device, dtype, kind):
    config = {**TINY_SD_UNET, **CLASS_CONFIGS[kind]}
    args, kwargs = inputs(config)
    check_block(f"tiny-sd UNet, class labels {kind}", UNet2DConditionModel.from_config(config),
                build_diffusers_model("unet", config), args, kwargs, dtype=dtype, device=device, scope="end_to_end")


@pytest.mark.parametrize("name", ["tiny-x4-upscaler", "tiny-kolors"])
def test_upscaler_and_kolors_unets_match_diffusers(device, dtype, name):
    config = UNET_CONFIGS[name]
    args, kwargs = inputs(config, height=9, width=11)
    check_block(f"{name} UNet", UNet2DConditionModel.from_config(config), build_diffusers_model("unet", config),
                args, kwargs, dtype=dtype, device=device, scope="end_to_end")


@pytest.mark.parametrize("name", ["x4-upscaler", "kolors"])
def test_official_upscaler_and_kolors_configs_have_diffusers_names_and_shapes(name):
    config = UNET_CONFIGS[name]
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config({k: v for k, v in config.items() if k[0] != "_"})
        ours = UNet2DConditionModel.from_config(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.official
@pytest.mark.parametrize("name", ["x4-upscaler", "kolors"])
def test_official_upscaler_and_kolors_unets_match_diffusers(device, dtype, name):
    config = UNET_CONFIGS[name]
    side = 64  # the x4 upscaler's 128-px latents take 30 GB of attention in float64; 64 exercises every block
    theirs = build_diffusers_model("unet", config, device=device)
    with torch.device(device):
        ours = UNet2DConditionModel.from_config(config)
    args, kwargs = inputs(config, 2, side, side, tokens=77, device=device)
    try:
        check_block(f"{name} UNet {side}x{side}", ours, theirs, args, kwargs, dtype=dtype, device=device,
                    scope="end_to_end")
    finally:
        del ours, theirs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def test_class_labels_are_required_and_refused_by_name():
    upscaler, _ = twins("tiny-x4-upscaler")
    (sample, t, text), kwargs = inputs(UNET_CONFIGS["tiny-x4-upscaler"])
    with pytest.raises(ValueError, match=r"needs class_labels"):
        upscaler(sample, t, text)
    plain, _ = twins("tiny-sd")
    (sample, t, text), _ = inputs(TINY_SD_UNET)
    with pytest.raises(ValueError, match=r"class_labels were given, but this model has no class embedding"):
        plain(sample, t, text, class_labels=torch.zeros(2, dtype=torch.long))


def test_kolors_text_must_be_encoder_hid_dim_wide():
    ours, _ = twins("tiny-kolors")
    (sample, t, text), kwargs = inputs(UNET_CONFIGS["tiny-kolors"])
    with pytest.raises(ValueError, match=r"\(2, M, 40\).*got \(2, 7, 64\)"):
        ours(sample, t, torch.randn(2, 7, 64), **kwargs)


# --- attention masks -------------------------------------------------------------------------------


def test_self_attention_mask_matches_diffusers(device, dtype):
    # A self-attention mask is over the image tokens, so (as in diffusers) every transformer must work at
    # one resolution: the tiny SD UNet without its mid block has them all at full size.
    config = {**TINY_SD_UNET, "mid_block_type": None}
    args, kwargs = inputs(config, height=4, width=6)
    mask = torch.ones(2, 24)
    mask[0, 5:11] = 0
    text_mask = torch.ones(2, TEXT_TOKENS)
    text_mask[1, 3:] = 0
    check_block("tiny-sd UNet, self- and cross-attention masks", UNet2DConditionModel.from_config(config),
                build_diffusers_model("unet", config), args,
                {**kwargs, "attention_mask": mask, "encoder_attention_mask": text_mask},
                dtype=dtype, device=device, scope="end_to_end")


def test_only_cross_attention_reads_the_self_attention_mask_over_the_text(device, dtype):
    # With only_cross_attention the first attention reads the text, so attention_mask is over the text tokens.
    config = {**TINY_SD_UNET, "only_cross_attention": True, "mid_block_type": None}  # the mid block self-attends
    args, kwargs = inputs(config)
    mask = torch.ones(2, TEXT_TOKENS)
    mask[0, 2:] = 0
    check_block("tiny-sd UNet, only_cross_attention + mask", UNet2DConditionModel.from_config(config),
                build_diffusers_model("unet", config), args, {**kwargs, "attention_mask": mask},
                dtype=dtype, device=device, scope="end_to_end")


def test_a_mask_of_the_wrong_length_says_what_fits():
    ours, _ = twins("tiny-sd")
    (sample, t, text), _ = inputs(TINY_SD_UNET)
    with pytest.raises(ValueError, match=r"does not fit 7 keys"):
        ours(sample, t, text, encoder_attention_mask=torch.ones(2, 5))


# --- cross_attention_kwargs: the LoRA scale ----------------------------------------------------------


def test_lora_scale_without_lora_changes_nothing_as_in_diffusers(device, dtype):
    args, kwargs = inputs(TINY_SD_UNET)
    check_block("tiny-sd UNet, cross_attention_kwargs scale 0.3", UNet2DConditionModel.from_config(TINY_SD_UNET),
                build_diffusers_model("unet", TINY_SD_UNET), args,
                {**kwargs, "cross_attention_kwargs": {"scale": 0.3}}, dtype=dtype, device=device, scope="end_to_end")


class ToyLoRA(torch.nn.Module):
    """What a LoRA module does at the hook: base(x) + lora_scale * up(down(x)); it records the scales it saw."""

    takes_lora_scale = True

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base, self.seen = base, []
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)

    def forward(self, x, lora_scale):
        self.seen.append(lora_scale)
        return self.base(x) + lora_scale * self.up(self.down(x))


@torch.no_grad()
def test_the_lora_scale_reaches_a_lora_layer_and_scales_its_delta():
    ours, theirs = twins("tiny-sd")
    args, kwargs = inputs(TINY_SD_UNET)
    expected = theirs(*args, **kwargs).sample
    attn = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn.to_v = ToyLoRA(attn.to_v)
    ff = ours.mid_block.attentions[0].transformer_blocks[0].ff
    ff.net[2] = ToyLoRA(ff.net[2])
    assert_parity("LoRA at scale 0 = no LoRA", ours(*args, **kwargs, cross_attention_kwargs={"scale": 0.0}), expected,
                  scope="end_to_end")
    half = ours(*args, **kwargs, cross_attention_kwargs={"scale": 0.5})
    full = ours(*args, **kwargs)
    assert attn.to_v.seen == [0.0, 0.5, 1.0] and ff.net[2].seen == [0.0, 0.5, 1.0]
    assert not torch.allclose(half, expected) and not torch.allclose(half, full)
    with pytest.raises(ValueError, match=r"cross_attention_kwargs \['gligen'\] are not taken"):
        ours(*args, **kwargs, cross_attention_kwargs={"gligen": {}})


# --- residuals from outside: ControlNet and T2I-Adapter ------------------------------------------------


def skip_shapes(config: dict, batch: int, height: int, width: int) -> tuple[list, tuple]:
    """The shapes of the UNet's skips (ControlNet's down residuals) and of the mid block's output."""
    shapes, h, w = [], height, width
    channels = config["block_out_channels"]
    layers = config["layers_per_block"]
    shapes.append((batch, channels[0], h, w))
    for i, c in enumerate(channels):
        shapes += [(batch, c, h, w)] * layers
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, c, h, w))
    return shapes, (batch, channels[-1], h, w)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_controlnet_residuals_match_diffusers(device, dtype, name):
    config = UNET_CONFIGS[name]
    args, kwargs = inputs(config, height=9, width=7)
    down, mid = skip_shapes(config, 2, 9, 7)
    g = torch.Generator().manual_seed(3)
    residuals = dict(down_block_additional_residuals=tuple(torch.randn(s, generator=g) for s in down),
                     mid_block_additional_residual=torch.randn(mid, generator=g))
    check_block(f"{name} UNet + ControlNet residuals", UNet2DConditionModel.from_config(config),
                build_diffusers_model("unet", config), args, {**kwargs, **residuals}, dtype=dtype, device=device,
                scope="end_to_end")


def test_controlnet_residuals_of_the_wrong_count_or_shape_are_refused():
    ours, _ = twins("tiny-sd")
    args, kwargs = inputs(TINY_SD_UNET)
    down, mid = skip_shapes(TINY_SD_UNET, 2, 8, 8)
    with pytest.raises(ValueError, match=r"pass one residual per skip"):
        ours(*args, down_block_additional_residuals=[torch.zeros(s) for s in down[:-1]],
             mid_block_additional_residual=torch.zeros(mid))
    with pytest.raises(ValueError, match=r"ControlNet residuals come as a pair"):
        ours(*args, down_block_additional_residuals=[torch.zeros(s) for s in down])


@torch.no_grad()
def test_t2i_adapter_residuals_match_diffusers(device, dtype):
    # diffusers pops the feature maps off the list it is given, so each call gets its own list.
    config = TINY_SD_UNET
    args, kwargs = inputs(config, height=8, width=10)
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, 32, 8, 10, generator=g), torch.randn(2, 64, 4, 5, generator=g)]
    ours, theirs = twins("tiny-sd")
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    args, kwargs, features = cast(args, dtype, device), cast(kwargs, dtype, device), cast(features, dtype, device)
    mine = ours(*args, **kwargs, down_intrablock_additional_residuals=list(features))
    ref = theirs(*args, **kwargs, down_intrablock_additional_residuals=list(features)).sample
    exact = None
    if dtype in (torch.float16, torch.bfloat16):
        f64 = lambda v: cast(v, torch.float64, device)  # noqa: E731
        exact = copy.deepcopy(theirs).double()(*f64(args), **f64(kwargs),
                                                down_intrablock_additional_residuals=f64(list(features))).sample
    assert_parity("tiny-sd UNet + T2I-Adapter features", mine, ref, exact, dtype=dtype, scope="end_to_end")
    plain = ours(*args, **kwargs)
    assert not torch.allclose(mine, plain)
    with pytest.raises(ValueError, match=r"1 feature maps were left over"):
        ours(*args, **kwargs, down_intrablock_additional_residuals=[*features, features[-1], features[0]])
