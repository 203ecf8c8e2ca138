"""Small, realistic edits to diffusers, the kind a contributor makes and a reviewer misses.

Each `Mutation` is one edit to one file of a copy of the installed diffusers: the first
occurrence of `old` after `anchor` becomes `new`. `expected` is the row that `pare parity
--reference-path COPY` must name as its first failure (component, row name), at the default
depth; `expected_all`, where it differs, the row at `--depth all`. `flags` are extra
`pare parity` flags the edit needs to show at all (empty: the default command catches it).

`parity_tests/test_mutations.py` runs them; `scripts/mutation_table.py` runs them under each
mode (fp32, fp64, --depth all) for the README's table.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the edit in words
    path: str  # file inside the diffusers package
    anchor: str  # the edit is the first `old` after this text
    old: str
    new: str
    expected: tuple[str, str]  # (component, first failing row) at the default depth
    expected_all: tuple[str, str] | None = None  # at --depth all, where it names a module inside that block
    flags: tuple[str, ...] = field(default_factory=tuple)
    gpu: bool = False  # needs the GPU tier (official sizes or CUDA half precision)


TB0 = "down_blocks.0.attentions.0.transformer_blocks.0"  # the tiny SD UNet's first transformer block

MUTATIONS = [
    # --- UNet ---------------------------------------------------------------------------------
    Mutation("geglu-tanh", "GEGLU's exact GELU swapped for the tanh approximation",
             "models/activations.py", "class GEGLU", "return F.gelu(gate)", 'return F.gelu(gate, approximate="tanh")',
             ("unet", TB0), ("unet", f"{TB0}.ff.net.0")),
    Mutation("resnet-norm1-eps", "ResnetBlock2D.norm1's GroupNorm eps multiplied by 10",
             "models/resnet.py", "class ResnetBlock2D",
             "num_channels=in_channels, eps=eps, affine=True)", "num_channels=in_channels, eps=eps * 10, affine=True)",
             ("unet", "down_blocks.0.resnets.0"), ("unet", "down_blocks.0.resnets.0.norm1")),
    # (Attention.scale itself is dead code for SD: AttnProcessor2_0 leaves the scale to SDPA's default.)
    Mutation("attention-scale", "the softmax scale 1/sqrt(d) given to SDPA off by one part in 10^4",
             "models/attention_processor.py", "class AttnProcessor2_0",
             "attn_mask=attention_mask, dropout_p=0.0, is_causal=False",
             "attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale * 1.0001",
             ("unet", TB0), ("unet", f"{TB0}.attn1")),
    Mutation("transformer-norm-eps", "Transformer2DModel's default LayerNorm eps 1e-5 -> 1e-6",
             "models/transformers/transformer_2d.py", "class Transformer2DModel",
             "norm_eps: float = 1e-5,", "norm_eps: float = 1e-6,",
             ("unet", TB0), ("unet", f"{TB0}.norm1")),
    Mutation("timestep-max-period", "the sinusoidal timestep embedding's max_period 10000 -> 10001",
             "models/embeddings.py", "def get_timestep_embedding", "max_period: int = 10000,", "max_period: int = 10001,",
             ("unet", "time_proj")),
    Mutation("sdxl-add-embeds-order", "SDXL's added conditioning concatenated as (time ids, pooled text)",
             "models/unets/unet_2d_condition.py", "time_embeds = self.add_time_proj",
             "torch.concat([text_embeds, time_embeds], dim=-1)", "torch.concat([time_embeds, text_embeds], dim=-1)",
             ("unet", "UNet2DConditionModel"), flags=("--config", "tiny-sdxl", "--components", "unet")),
    # --- VAE ----------------------------------------------------------------------------------
    Mutation("vae-encoder-norm-eps", "the VAE encoder's output GroupNorm eps 1e-6 -> 1e-5",
             "models/autoencoders/vae.py", "class Encoder(", "norm_num_groups, eps=1e-6)", "norm_num_groups, eps=1e-5)",
             ("vae", "vae.encoder.conv_norm_out")),
    Mutation("vae-encoder-downsample-pad", "Downsample2D's asymmetric pad (right/bottom) put left/top",
             "models/downsampling.py", "class Downsample2D", "pad = (0, 1, 0, 1)", "pad = (1, 0, 1, 0)",
             ("vae", "vae.encoder.down_blocks.0.downsamplers.0")),
    Mutation("vae-decoder-norm-eps", "the VAE decoder's output GroupNorm eps 1e-6 -> 1e-5",
             "models/autoencoders/vae.py", "class Decoder(", "norm_num_groups, eps=1e-6)", "norm_num_groups, eps=1e-5)",
             ("vae", "vae.decoder.conv_norm_out")),
    Mutation("vae-decoder-output-scale", "UpDecoderBlock2D's default output_scale_factor 1.0 -> 1.0001",
             "models/unets/unet_2d_blocks.py", "class UpDecoderBlock2D",
             "output_scale_factor: float = 1.0,", "output_scale_factor: float = 1.0001,",
             ("vae", "vae.decoder.up_blocks.0.resnets.0")),
    # --- scheduler ----------------------------------------------------------------------------
    Mutation("ddim-final-alpha-index", "DDIM's final alpha_bar (set_alpha_to_one=False) read one index late: "
             "only the last step changes", "schedulers/scheduling_ddim.py", "self.final_alpha_cumprod = ",
             "else self.alphas_cumprod[0]", "else self.alphas_cumprod[1]",
             ("scheduler", "DDIMScheduler.step 50 (t=1)")),
    Mutation("ddim-betas-float64", "DDIM's scaled_linear betas computed in float64, then rounded to float32",
             "schedulers/scheduling_ddim.py", 'beta_schedule == "scaled_linear"',
             "torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2",
             "(torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2).float()",
             ("scheduler", "DDIMScheduler.step 1 (t=981)")),
    # --- pipeline -----------------------------------------------------------------------------
    Mutation("pipeline-guidance-default", "StableDiffusionPipeline's default guidance_scale 7.5 -> 7.0",
             "pipelines/stable_diffusion/pipeline_stable_diffusion.py", "def __call__(",
             "guidance_scale: float = 7.5,", "guidance_scale: float = 7.0,",
             ("pipeline", "latents after step 1 (t=981)")),
    # Meant for fp16 (decoding in float32 there), it also downcasts a float64 run, which is how the default catches it;
    # an fp16 run misses it: the tiny VAE's fp16 error is under the budget's floor.
    Mutation("sd-vae-decode-upcast", "SD's pipeline always decodes in float32 (SDXL's force_upcast, copied over)",
             "pipelines/stable_diffusion/pipeline_stable_diffusion.py", 'if not output_type == "latent":',
             "image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[",
             "image = self.vae.float().decode((latents / self.vae.config.scaling_factor).float(), return_dict=False, "
             "generator=generator)[",
             ("pipeline", "image")),
    Mutation("sdxl-vae-scaling-hardcoded", "SDXL's decode divides by SD1's scaling factor 0.18215, not the config's",
             "pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py", "needs_upcasting",
             "latents = latents / self.vae.config.scaling_factor", "latents = latents / 0.18215",
             ("pipeline", "image"), flags=("--config", "sdxl", "--components", "pipeline", "--steps", "2",
                                           "--device", "cuda", "--dtype", "fp16"), gpu=True),
]


def apply(mutation: Mutation, source: Path, tree: Path) -> Path:
    """A copy of the diffusers package `source` under `tree/src/diffusers` with `mutation` applied.

    Files are hard links to the installed ones (fast, no space), except the edited file, which is
    written anew so that the installed diffusers stays untouched.
    """
    package = tree / "src" / "diffusers"
    shutil.copytree(source, package, copy_function=os.link, ignore=shutil.ignore_patterns("__pycache__"))
    target = package / mutation.path
    text = target.read_text()
    at = text.find(mutation.anchor)
    if at < 0:
        raise LookupError(f"{mutation.name}: anchor {mutation.anchor!r} not in {mutation.path}")
    where = text.find(mutation.old, at)
    if where < 0:
        raise LookupError(f"{mutation.name}: {mutation.old!r} not after {mutation.anchor!r} in {mutation.path}")
    edited = text[:where] + mutation.new + text[where + len(mutation.old):]
    target.unlink()  # break the hard link before writing
    target.write_text(edited)
    return tree
