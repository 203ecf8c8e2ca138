"""The UNet's key map: LDM's `openaimodel.UNetModel` names (`model.diffusion_model.*`) -> diffusers'.

Original: `ldm/modules/diffusionmodules/openaimodel.py` (`UNetModel`, `ResBlock`), Stability's
SD 1.x / 2.x code; SDXL's `sgm` UNet has the same names. diffusers twin of this table:
`loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`).

LDM numbers its blocks in flat lists where diffusers nests them:

    input_blocks.0                 conv_in
    input_blocks.n, n >= 1         down block b, layer l: [ResBlock, (SpatialTransformer)]; then [Downsample]
    middle_block.0 / .1 / .2       ResBlock, SpatialTransformer, ResBlock
    output_blocks.n                up block b, layer l: [ResBlock, (SpatialTransformer), (Upsample)]

so down block b starts at input block 1 + sum over earlier blocks of (layers + 1 downsampler),
and up block b at output block sum over earlier blocks of (layers + 1). The transformer blocks
(`SpatialTransformer`) carry diffusers' names already (norm, proj_in, transformer_blocks.*,
proj_out), so only their prefix moves; the ResBlock's layers are renamed (RESNET).
"""

from __future__ import annotations

from .keymap import KeyMap

# diffusers ResnetBlock2D -> LDM ResBlock (in_layers = [GroupNorm, SiLU, Conv], out_layers = [GroupNorm, SiLU, Dropout, Conv])
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

UNET_ROWS = [
    # diffusers prefix                    LDM prefix                          renames after the prefix
    ("time_embedding.linear_1",           "time_embed.0",                     {}),
    ("time_embedding.linear_2",           "time_embed.2",                     {}),
    ("add_embedding.linear_1",            "label_emb.0.0",                    {}),  # SDXL's text_time embedding
    ("add_embedding.linear_2",            "label_emb.0.2",                    {}),
    ("conv_in",                           "input_blocks.0.0",                 {}),
    ("down_blocks.{b}.resnets.{l}",       "input_blocks.{n_in}.0",            RESNET),
    ("down_blocks.{b}.attentions.{l}",    "input_blocks.{n_in}.1",            {}),
    ("down_blocks.{b}.downsamplers.0.conv", "input_blocks.{n_in}.0.op",       {}),
    ("mid_block.resnets.0",               "middle_block.0",                   RESNET),
    ("mid_block.attentions.0",            "middle_block.1",                   {}),
    ("mid_block.resnets.1",               "middle_block.2",                   RESNET),
    ("up_blocks.{b}.resnets.{l}",         "output_blocks.{n_out}.0",          RESNET),
    ("up_blocks.{b}.attentions.{l}",      "output_blocks.{n_out}.1",          {}),
    ("up_blocks.{b}.upsamplers.0.conv",   "output_blocks.{n_out}.{up_at}.conv", {}),  # after the attention, if any
    ("conv_norm_out",                     "out.0",                            {}),
    ("conv_out",                          "out.2",                            {}),
]


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_fields(groups: dict, config: dict) -> dict:
    """LDM's flat block index for diffusers' (block b, layer l); no l means the block's down/upsampler."""
    n = len(config["down_block_types"])
    layers = _per_block(config["layers_per_block"], n)
    up_layers = list(reversed(layers))
    b = groups.get("b", 0)
    l_down = groups.get("l", layers[b])  # the downsampler comes after the block's layers
    l_up = groups.get("l", up_layers[b])  # the upsampler sits in the block's last output block
    has_attention = config["up_block_types"][b].startswith("CrossAttn")
    return {
        **groups,
        "n_in": 1 + sum(k + 1 for k in layers[:b]) + l_down,
        "n_out": sum(k + 1 for k in up_layers[:b]) + l_up,
        "up_at": 2 if has_attention else 1,
    }


UNET_MAP = KeyMap(UNET_ROWS, unet_fields)
