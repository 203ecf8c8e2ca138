"""Model configs as data: the official SD checkpoints' `config.json` contents, and tiny twins for tests.

The official dicts are what the Hub repos carry (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), so a model built
from them has exactly the official parameter shapes. The tiny ones keep every structural
feature of their family at a size that runs in milliseconds on a CPU.
"""

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# runwayml/stable-diffusion-inpainting: SD1.5 with the masked image latents (4) and the mask (1) as extra inputs.
SD15_INPAINT_UNET = {**SD15_UNET, "in_channels": 9}

# SimianLuo/LCM_Dreamshaper_v7: SD1.5 distilled for few-step sampling, with a guidance-scale embedding.
LCM_SD15_UNET = {**SD15_UNET, "time_cond_proj_dim": 256}

# stabilityai/stable-diffusion-x4-upscaler: the low-res image's 3 channels beside the 4 latents; the noise level
# added to that image is a class label (1000 of them); no self-attention in the first three stages.
X4_UPSCALER_UNET = {
    **SD15_UNET,
    "block_out_channels": [256, 512, 512, 1024],
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "in_channels": 7,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "sample_size": 128,
    "use_linear_projection": True,
}

# Kwai-Kolors/Kolors-diffusers: SDXL's UNet reading ChatGLM3's 4096-wide states through a projection
# (encoder_hid_dim_type "text_proj"); its pooled text is 4096 wide too (4096 + 6 x 256 = 5632).
KOLORS_UNET = {**SDXL_UNET, "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj",
               "projection_class_embeddings_input_dim": 5632}

SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD21_VAE = {**SD_VAE, "sample_size": 768}  # stabilityai/stable-diffusion-2-1: the SD VAE, at 768 px
# the x4 upscaler's VAE: three levels (a factor of 4), latents scaled by 0.08333
X4_UPSCALER_VAE = {**SD_VAE, "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
                   "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 256, "scaling_factor": 0.08333}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# Tiny twins: same block types and options, channels small enough for CPU tests in seconds.
TINY_SD_UNET = {
    **SD15_UNET,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 16,
}

TINY_SD2_UNET = {
    **SD21_UNET,
    **{k: TINY_SD_UNET[k] for k in ("block_out_channels", "down_block_types", "up_block_types", "norm_num_groups",
                                   "layers_per_block", "sample_size")},
    "attention_head_dim": [4, 8],
    "cross_attention_dim": 48,
}

TINY_SDXL_UNET = {
    **SDXL_UNET,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [4, 8],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "addition_time_embed_dim": 8,
    # text_embeds (32) + 6 time ids x addition_time_embed_dim (8)
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 16,
}

TINY_SD_INPAINT_UNET = {**TINY_SD_UNET, "in_channels": 9}
TINY_LCM_UNET = {**TINY_SD_UNET, "time_cond_proj_dim": 16}

TINY_X4_UPSCALER_UNET = {
    **TINY_SD2_UNET,
    "cross_attention_dim": 32,  # TINY_TEXT's width
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "in_channels": 7,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, False],
}
TINY_KOLORS_UNET = {**TINY_SDXL_UNET, "encoder_hid_dim": 40, "encoder_hid_dim_type": "text_proj",
                    # pooled text 40 wide + 6 time ids x 8
                    "projection_class_embeddings_input_dim": 88}

TINY_VAE = {
    **SD_VAE,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "sample_size": 32,
}

UNET_CONFIGS = {"tiny-sd": TINY_SD_UNET, "tiny-sd2": TINY_SD2_UNET, "tiny-sdxl": TINY_SDXL_UNET,
                "tiny-sd-inpaint": TINY_SD_INPAINT_UNET, "tiny-lcm": TINY_LCM_UNET,
                "tiny-x4-upscaler": TINY_X4_UPSCALER_UNET, "tiny-kolors": TINY_KOLORS_UNET,
                "sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET,
                "sd15-inpaint": SD15_INPAINT_UNET, "lcm-sd15": LCM_SD15_UNET,
                "x4-upscaler": X4_UPSCALER_UNET, "kolors": KOLORS_UNET}
VAE_CONFIGS = {"tiny": TINY_VAE, "sd": SD_VAE, "sd21": SD21_VAE, "sdxl": SDXL_VAE, "x4-upscaler": X4_UPSCALER_VAE}

# Text encoders: `transformers.CLIPTextConfig` arguments of the official repos' text_encoder/ folders
# (vocabulary and positions aside: those follow the tokenizer a checkpoint is made with).
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14: SD 1.x, and SDXL's first encoder
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}
OPENCLIP_H_TEXT = {  # SD 2.x: OpenCLIP ViT-H/14, its last layer dropped (23 of 24)
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
    "hidden_act": "gelu", "projection_dim": 512,
}
OPENCLIP_BIGG_TEXT = {  # SDXL's second encoder (CLIPTextModelWithProjection): OpenCLIP ViT-bigG/14
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "hidden_act": "gelu", "projection_dim": 1280,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
             "projection_dim": 32}

# --- ControlNets -------------------------------------------------------------------------------
# lllyasviel/sd-controlnet-canny (and -depth, -hed, ...): SD1.5's down half, the condition encoder at
# the paper's (16, 32, 96, 256) channels.
SD15_CONTROLNET = {
    "_class_name": "ControlNetModel",
    **{k: SD15_UNET[k] for k in ("act_fn", "attention_head_dim", "block_out_channels", "cross_attention_dim",
                                 "down_block_types", "downsample_padding", "flip_sin_to_cos", "freq_shift",
                                 "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps",
                                 "norm_num_groups")},
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}

# diffusers/controlnet-canny-sdxl-1.0: SDXL base's down half.
SDXL_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def controlnet_config_like(unet: dict, conditioning_embedding_out_channels=(16, 32, 96, 256)) -> dict:
    """A ControlNet config for a UNet config: its down half, as `ControlNetModel.from_unet` makes it."""
    keys = ("act_fn", "addition_embed_type", "addition_time_embed_dim", "attention_head_dim", "block_out_channels",
            "cross_attention_dim", "down_block_types", "downsample_padding", "flip_sin_to_cos", "freq_shift",
            "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps", "norm_num_groups",
            "projection_class_embeddings_input_dim", "transformer_layers_per_block", "upcast_attention",
            "use_linear_projection")
    return {"_class_name": "ControlNetModel", **{k: unet[k] for k in keys if k in unet},
            "conditioning_embedding_out_channels": list(conditioning_embedding_out_channels)}


# Tiny ControlNets: the published condition encoder (a factor of 8 from pixels to latents) ...
TINY_SD_CONTROLNET = controlnet_config_like(TINY_SD_UNET)
TINY_SDXL_CONTROLNET = controlnet_config_like(TINY_SDXL_UNET)
# ... and, for the tiny pipelines, whose VAE has 2 levels (a factor of 2), a one-stage encoder.
TINY_SD_CONTROLNET_PIPE = controlnet_config_like(TINY_SD_UNET, (8, 16))
TINY_SDXL_CONTROLNET_PIPE = controlnet_config_like(TINY_SDXL_UNET, (8, 16))

CONTROLNET_CONFIGS = {"tiny-sd": TINY_SD_CONTROLNET, "tiny-sdxl": TINY_SDXL_CONTROLNET,
                      "tiny-sd-pipe": TINY_SD_CONTROLNET_PIPE, "tiny-sdxl-pipe": TINY_SDXL_CONTROLNET_PIPE,
                      "sd15": SD15_CONTROLNET, "sdxl": SDXL_CONTROLNET}

TINY_X4_UPSCALER_VAE = {**TINY_VAE, "scaling_factor": 0.08333}

# The x4 upscaler's schedulers (scheduler/ and low_res_scheduler/ of stabilityai/stable-diffusion-x4-upscaler):
# DDIM on v-prediction for the latents, DDPM to noise the low-resolution image to `noise_level`.
X4_UPSCALER_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02,
                         "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
                         "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1}
X4_UPSCALER_LOW_RES_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02,
                                 "beta_schedule": "scaled_linear", "clip_sample": True, "num_train_timesteps": 1000,
                                 "variance_type": "fixed_small"}
