"""pare against Stability's original code: checkpoints that ldm's own modules wrote, no converter of ours involved.

`stable-diffusion-sdkit` (pinned in the README's set-up command) ships the original `ldm` package:
`ldm/modules/diffusionmodules/openaimodel.py` (`UNetModel`) and `ldm/modules/diffusionmodules/model.py`
(the VAE's `Encoder` and `Decoder`; `ldm/models/autoencoder.py` adds the two 1x1 quant convs, built
here directly since that class needs the training stack). Each test:

1. builds the original module at an SD v1 or v2 inference config (from `configs/stable-diffusion/
   v1-inference.yaml`, `v2-inference-v.yaml`), scaled down in width for the CPU tier, with a seeded
   random init of *every* parameter (ldm zero-initialises its output convs, which would hide a
   swapped weight);
2. saves its state dict under the single-file prefixes (`model.diffusion_model.`, `first_stage_model.`);
3. loads that file with pare's `from_single_file` and compares the forward passes within the fp32
   block tolerance (`assert_parity`).

The official widths (SD1.5 / SD2.1 UNet and the SD VAE) form the GPU tier (`official`), where the
config is not passed but recognised from the file.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import pare
from pare.configs import SD15_UNET, SD21_UNET, SD_VAE
from pare.parity import assert_parity

openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                                  reason="needs stable-diffusion-sdkit (README set-up)")
ldm_model = pytest.importorskip("ldm.modules.diffusionmodules.model")


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (weights ~ N(0, 1/fan_in), biases small, norm scales near 1), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# The UNet's original arguments (v1-inference.yaml / v2-inference-v.yaml unet_config.params) and the
# diffusers config of the same network. `width` scales model_channels (320 in SD); ldm's GroupNorm has 32
# groups, so widths stay multiples of 32.
def v1_unet(width: int = 320, context: int = 768, mult=(1, 2, 4, 4), layers: int = 2, attention=(4, 2, 1)):
    ldm = dict(image_size=32, in_channels=4, out_channels=4, model_channels=width, attention_resolutions=list(attention),
               num_res_blocks=layers, channel_mult=list(mult), num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=context, use_checkpoint=False, legacy=False)
    down = ["CrossAttnDownBlock2D" if 2 ** i in attention else "DownBlock2D" for i in range(len(mult))]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    config = {**SD15_UNET, "block_out_channels": [width * m for m in mult], "cross_attention_dim": context,
              "layers_per_block": layers, "down_block_types": down, "up_block_types": up, "attention_head_dim": 8}
    return ldm, config


def v2_unet(width: int = 320, context: int = 1024, head_channels: int = 64, mult=(1, 2, 4, 4), layers: int = 2,
            attention=(4, 2, 1)):
    ldm, config = v1_unet(width, context, mult, layers, attention)
    ldm = {**ldm, "num_heads": -1, "num_head_channels": head_channels, "use_linear_in_transformer": True}
    config = {**SD21_UNET, **{k: config[k] for k in ("block_out_channels", "cross_attention_dim", "layers_per_block",
                                                     "down_block_types", "up_block_types")},
              "attention_head_dim": [width * m // head_channels for m in mult]}
    return ldm, config


def sd_vae(width: int = 128, mult=(1, 2, 4, 4), layers: int = 2):
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=width, ch_mult=list(mult),
                    num_res_blocks=layers, attn_resolutions=[], dropout=0.0)
    config = {**SD_VAE, "block_out_channels": [width * m for m in mult], "layers_per_block": layers,
              "down_block_types": ["DownEncoderBlock2D"] * len(mult), "up_block_types": ["UpDecoderBlock2D"] * len(mult)}
    return ddconfig, config


UNET_CASES = {
    "tiny-v1": lambda: v1_unet(width=32, context=32, mult=(1, 2), layers=1, attention=(1,)),
    "v1-layout": lambda: v1_unet(width=32, context=32),  # every block of SD1.5, at width 32
    "tiny-v2": lambda: v2_unet(width=32, context=48, head_channels=8, mult=(1, 2), layers=1, attention=(1,)),
    "v2-layout": lambda: v2_unet(width=32, context=48, head_channels=8),
}
VAE_CASES = {"tiny": lambda: sd_vae(width=32, mult=(1, 2), layers=1), "sd-layout": lambda: sd_vae(width=32)}


def original_unet(ldm_args: dict, seed: int = 0):
    unet = openaimodel.UNetModel(**ldm_args)
    randomise(unet, seed)
    return unet.eval()


class OriginalVAE(torch.nn.Module):
    """ldm.models.autoencoder.AutoencoderKL's inference parts: the names its state dict has."""

    def __init__(self, ddconfig: dict, embed_dim: int = 4):
        super().__init__()
        self.encoder = ldm_model.Encoder(**ddconfig)
        self.decoder = ldm_model.Decoder(**ddconfig)
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def moments(self, x):  # AutoencoderKL.encode, before DiagonalGaussianDistribution
        return self.quant_conv(self.encoder(x))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def write(module: torch.nn.Module, prefix: str, path, dtype=None) -> str:
    tensors = {prefix + k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(path))
    return str(path)


def unet_inputs(context: int, device, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)  # two samples, two timesteps: the batch is not mixed up
    t = torch.tensor([999, 37])
    text = torch.randn(2, 7, context, generator=g)
    return x.to(device), t.to(device), text.to(device)


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_from_original_ldm_checkpoint_matches_ldm(case, tmp_path):
    ldm_args, config = UNET_CASES[case]()
    theirs = original_unet(ldm_args)
    path = write(theirs, "model.diffusion_model.", tmp_path / f"{case}.safetensors")
    ours = pare.UNet2DConditionModel.from_single_file(path, config=config)
    x, t, text = unet_inputs(config["cross_attention_dim"], "cpu")
    with torch.no_grad():
        expected = theirs(x, t, context=text)
        got = ours(x, t, text)
    assert_parity(f"UNet {case}: pare from ldm's own checkpoint vs ldm.UNetModel", got, expected, scope="block")


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_vae_from_original_ldm_checkpoint_matches_ldm(case, tmp_path):
    ddconfig, config = VAE_CASES[case]()
    torch.manual_seed(0)
    theirs = OriginalVAE(ddconfig).eval()
    randomise(theirs, 1)
    path = write(theirs, "first_stage_model.", tmp_path / f"{case}.safetensors")
    ours = pare.AutoencoderKL.from_single_file(path, config=config)
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        assert_parity(f"VAE {case} encode", ours.encode(image).parameters, theirs.moments(image), scope="block")
        assert_parity(f"VAE {case} decode", ours.decode(z), theirs.decode(z), scope="block")


def test_standalone_vae_file_without_prefix_loads(tmp_path):
    """Stability's separate VAE files (vae-ft-mse-840000) have the VAE's keys bare, without first_stage_model."""
    ddconfig, config = VAE_CASES["tiny"]()
    theirs = OriginalVAE(ddconfig).eval()
    randomise(theirs, 3)
    ours = pare.AutoencoderKL.from_single_file(write(theirs, "", tmp_path / "vae.safetensors"), config=config)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_parity("standalone VAE decode", ours.decode(z), theirs.decode(z), scope="block")


@pytest.mark.official
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_official_unet_from_original_ldm_checkpoint_matches_ldm(family, tmp_path, device):
    """SD1.5 / SD2.1 at their official widths; no config=: the family is recognised from the file."""
    ldm_args, config = v1_unet() if family == "v1" else v2_unet()
    theirs = original_unet(ldm_args).to(device)
    path = write(theirs, "model.diffusion_model.", tmp_path / f"{family}.safetensors")
    ours = pare.UNet2DConditionModel.from_single_file(path, device=device)
    assert {k: v for k, v in ours.config.items() if k in config} == {
        k: v for k, v in pare.UNet2DConditionModel.from_config(SD15_UNET if family == "v1" else SD21_UNET)
        .config.items() if k in config}
    x, t, text = unet_inputs(config["cross_attention_dim"], device, size=64)
    with torch.no_grad():
        assert_parity(f"official {family} UNet vs ldm", ours(x, t, text), theirs(x, t, context=text), scope="block")


@pytest.mark.official
@pytest.mark.cuda
def test_official_vae_from_original_ldm_checkpoint_matches_ldm(tmp_path, device):
    ddconfig, _ = sd_vae()
    theirs = OriginalVAE(ddconfig).eval()
    randomise(theirs, 5)
    theirs = theirs.to(device)
    ours = pare.AutoencoderKL.from_single_file(write(theirs, "first_stage_model.", tmp_path / "vae.safetensors"),
                                               device=device)
    g = torch.Generator().manual_seed(6)
    image = (torch.rand(1, 3, 256, 256, generator=g) * 2 - 1).to(device)
    z = torch.randn(1, 4, 32, 32, generator=g).to(device)
    with torch.no_grad():
        assert_parity("official VAE encode vs ldm", ours.encode(image).parameters, theirs.moments(image), scope="block")
        assert_parity("official VAE decode vs ldm", ours.decode(z), theirs.decode(z), scope="block")
