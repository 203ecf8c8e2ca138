"""The text encoders' key maps: OpenAI CLIP (SD 1.x, SDXL's first) and OpenCLIP (SD 2.x, SDXL's second).

Targets are transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`, as diffusers converts
them (`loaders/single_file_utils.py`: `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).
Keys here are written without transformers' `text_model.` prefix, which some versions of
`CLIPTextModel` drop (transformers 5.6 flattened it); the loader adds it where the model has it.

- OpenAI CLIP: the file holds transformers' own CLIPTextModel under `cond_stage_model.transformer.`
  (SDXL: `conditioner.embedders.0.transformer.`), so names only gain `text_model.`.
- OpenCLIP (`open_clip.model.TextTransformer` names): the attention's q, k and v projections
  are one fused `in_proj` of shape (3D, D), split in three; the `text_projection` is an (D, P)
  matrix applied as `x @ W`, transposed into a Linear's (P, D) weight.
"""

from __future__ import annotations

from .keymap import KeyMap

OPENAI_CLIP_ROWS = [
    # diffusers (transformers) prefix   original prefix
    ("embeddings",                      "text_model.embeddings",        {}),
    ("encoder",                         "text_model.encoder",           {}),
    ("final_layer_norm",                "text_model.final_layer_norm",  {}),
]

OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
    "self_attn.q_proj.weight": ("attn.in_proj_weight", "qkv0"),
    "self_attn.k_proj.weight": ("attn.in_proj_weight", "qkv1"),
    "self_attn.v_proj.weight": ("attn.in_proj_weight", "qkv2"),
    "self_attn.q_proj.bias": ("attn.in_proj_bias", "qkv0"),
    "self_attn.k_proj.bias": ("attn.in_proj_bias", "qkv1"),
    "self_attn.v_proj.bias": ("attn.in_proj_bias", "qkv2"),
}

OPENCLIP_ROWS = [
    # diffusers (transformers) prefix     original prefix               renames after the prefix
    ("embeddings.token_embedding",        "token_embedding",            {}),
    ("embeddings.position_embedding",     "",                           {"weight": "positional_embedding"}),
    ("encoder.layers.{i}",                "transformer.resblocks.{i}",  OPENCLIP_LAYER),
    ("final_layer_norm",                  "ln_final",                   {}),
    ("text_projection",                   "",                           {"weight": ("text_projection", "transpose")}),
]

OPENAI_CLIP_MAP = KeyMap(OPENAI_CLIP_ROWS)
OPENCLIP_MAP = KeyMap(OPENCLIP_ROWS)
