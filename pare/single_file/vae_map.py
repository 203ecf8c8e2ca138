"""The VAE's key map: LDM's `AutoencoderKL` names (`first_stage_model.*`) -> diffusers'.

Original: `ldm/modules/diffusionmodules/model.py` (`Encoder`, `Decoder`, `ResnetBlock`,
`AttnBlock`) and `ldm/models/autoencoder.py` (`AutoencoderKL`: quant_conv, post_quant_conv).
diffusers twin of this table: `loaders/single_file_utils.py` (`convert_ldm_vae_checkpoint`).

Two differences beyond names:
- the decoder's up blocks are numbered from the lowest resolution in diffusers (`up_blocks.0`)
  and from the highest in LDM (`up.0`), so `up_blocks.b` is `up.{n - 1 - b}`;
- LDM's attention computes q, k, v and the output projection with 1x1 convs, (C, C, 1, 1);
  diffusers with Linear layers, (C, C): the reshape `linear_as_conv1x1`.
"""

from __future__ import annotations

from .keymap import KeyMap

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": ("q", "linear_as_conv1x1"),
    "to_k": ("k", "linear_as_conv1x1"),
    "to_v": ("v", "linear_as_conv1x1"),
    "to_out.0": ("proj_out", "linear_as_conv1x1"),
}

VAE_ROWS = [
    # diffusers prefix                          LDM prefix                        renames after the prefix
    ("encoder.conv_in",                         "encoder.conv_in",                {}),
    ("encoder.down_blocks.{b}.resnets.{l}",     "encoder.down.{b}.block.{l}",     VAE_RESNET),
    ("encoder.down_blocks.{b}.downsamplers.0",  "encoder.down.{b}.downsample",    {}),
    ("encoder.mid_block.resnets.0",             "encoder.mid.block_1",            VAE_RESNET),
    ("encoder.mid_block.attentions.0",          "encoder.mid.attn_1",             VAE_ATTENTION),
    ("encoder.mid_block.resnets.1",             "encoder.mid.block_2",            VAE_RESNET),
    ("encoder.conv_norm_out",                   "encoder.norm_out",               {}),
    ("encoder.conv_out",                        "encoder.conv_out",               {}),
    ("quant_conv",                              "quant_conv",                     {}),
    ("post_quant_conv",                         "post_quant_conv",                {}),
    ("decoder.conv_in",                         "decoder.conv_in",                {}),
    ("decoder.mid_block.resnets.0",             "decoder.mid.block_1",            VAE_RESNET),
    ("decoder.mid_block.attentions.0",          "decoder.mid.attn_1",             VAE_ATTENTION),
    ("decoder.mid_block.resnets.1",             "decoder.mid.block_2",            VAE_RESNET),
    ("decoder.up_blocks.{b}.resnets.{l}",       "decoder.up.{rev}.block.{l}",     VAE_RESNET),
    ("decoder.up_blocks.{b}.upsamplers.0",      "decoder.up.{rev}.upsample",      {}),
    ("decoder.conv_norm_out",                   "decoder.norm_out",               {}),
    ("decoder.conv_out",                        "decoder.conv_out",               {}),
]


def vae_fields(groups: dict, config: dict) -> dict:
    return {**groups, "rev": len(config["block_out_channels"]) - 1 - groups.get("b", 0)}


VAE_MAP = KeyMap(VAE_ROWS, vae_fields)
