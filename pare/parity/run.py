"""`pare parity`: load one checkpoint into pare and diffusers, hook every block, report where they part.

    pare parity                                   # a tiny checkpoint made on the spot, CPU, fp32
    pare parity --config sdxl --device cuda --dtype fp16   # the official SDXL config, random init
    pare parity --model DIR_OR_ID --device cuda --dtype fp16 --out docs/parity/sd15-fp16
    pare parity --model DIR --reference-path ~/src/diffusers   # a diffusers working copy

For each component the rows come in execution order; below float32 each block is also run
through a float64 copy of the diffusers model, and judged by the error budget of
`pare/parity/tolerances.py`. The first failing row names the block where pare first departs.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .. import configs
from ..loading import resolve_folder
from .blocks import block_names, compare_blocks
from .report import Report, make_header, to_text, write
from .scheduler_rows import scheduler_rows
from .tolerances import DTYPES

COMPONENTS = ("unet", "vae", "scheduler")
TEXT_TOKENS = 77


class VAEDecode(nn.Module):
    """`vae.decode` as a forward pass, so that the block hooks see the decoder run."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        out = self.vae.decode(z)
        return getattr(out, "sample", out)


class VAEEncode(nn.Module):
    """`vae.encode(x)`'s posterior mean as a forward pass (pare returns the distribution, diffusers wraps it)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        out = self.vae.encode(x)
        return getattr(out, "latent_dist", out).mean


# --config NAME: (UNet config, VAE config, scheduler prediction type) of a random-init checkpoint made now.
CONFIGS = {
    "tiny": (configs.TINY_SD_UNET, configs.TINY_VAE, "epsilon"),
    "sd15": (configs.SD15_UNET, configs.SD_VAE, "epsilon"),
    "sd21": (configs.SD21_UNET, configs.SD_VAE, "v_prediction"),
    "sdxl": (configs.SDXL_UNET, configs.SDXL_VAE, "epsilon"),
}


def make_checkpoint(reference: ModuleType, folder: Path, name: str, seed: int, device: torch.device,
                    dtype: torch.dtype) -> Path:
    """A pipeline folder (unet/, vae/, scheduler/, model_index.json) written by diffusers: config `name`, seeded random init."""
    unet, vae, prediction_type = CONFIGS[name]
    torch.manual_seed(seed)
    for sub, cls, config in (("unet", "UNet2DConditionModel", unet), ("vae", "AutoencoderKL", vae)):
        with torch.device(device):  # official configs are built where they run: far faster than on a CPU
            model = getattr(reference, cls).from_config({k: v for k, v in config.items() if not k.startswith("_")})
        with torch.no_grad():  # random norm affines: default init (1, 0) would hide affine bugs
            for m in model.modules():
                if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                    m.weight.normal_(1, 0.1)
                    m.bias.normal_(0, 0.1)
        model.to(dtype).save_pretrained(folder / sub)
        del model
    reference.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                            ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"],
                                                         "vae": ["diffusers", "AutoencoderKL"],
                                                         "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


def _float64_twin(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=torch.float64)


def unet_rows(reference, folder, device, dtype, seed, with64):
    from ..models.unet_2d_condition import UNet2DConditionModel

    ours = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, device=device)
    theirs = reference.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device).eval()
    cfg = ours.config
    g = torch.Generator(device).manual_seed(seed)
    batch, side = 2, cfg.sample_size  # batch 2: the unconditional and conditional halves of CFG
    sample = torch.randn(batch, cfg.in_channels, side, side, generator=g, device=device).to(dtype)
    context = torch.randn(batch, TEXT_TOKENS, cfg.cross_attention_dim, generator=g, device=device).to(dtype)
    kwargs = {"encoder_hidden_states": context}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        size = side * 8
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g, device=device).to(dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype),
        }
    args = (sample, torch.tensor(500, device=device))
    ref64 = _float64_twin(theirs, device) if with64 else None
    return compare_blocks(ours, theirs, args, kwargs, reference64=ref64).rows


def vae_rows(reference, folder, device, dtype, seed, with64):
    from ..models.autoencoder_kl import AutoencoderKL

    ours = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, device=device)
    theirs = reference.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device).eval()
    cfg = ours.config
    side = cfg.sample_size
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    g = torch.Generator(device).manual_seed(seed)
    z = torch.randn(1, cfg.latent_channels, side // factor, side // factor, generator=g, device=device).to(dtype)
    image = (torch.rand(1, cfg.in_channels, side, side, generator=g, device=device) * 2 - 1).to(dtype)
    rows = []
    for wrapper, stage, x in ((VAEEncode, "encoder", image), (VAEDecode, "decoder", z)):
        names = [f"vae.{stage}.{n}" for n in block_names(getattr(ours, stage))]
        names += ["vae.quant_conv"] if stage == "encoder" and ours.quant_conv is not None else []
        names = (["vae.post_quant_conv"] if stage == "decoder" and ours.post_quant_conv is not None else []) + names
        ref64 = wrapper(_float64_twin(theirs, device)) if with64 else None
        rows += compare_blocks(wrapper(ours), wrapper(theirs), (x,), names=names, reference64=ref64).rows
    return rows


def run(args: argparse.Namespace) -> Report:
    from .reference import import_reference

    reference = import_reference(args.reference_path)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":  # parity in float32 means IEEE float32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    components = args.components.split(",")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise SystemExit(f"pare parity: unknown components {unknown}; expected some of {list(COMPONENTS)}")

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="pare-parity-")
        # Weights are stored in the run's precision (fp32 for fp32 runs), as an fp16 variant would be.
        folder = make_checkpoint(reference, Path(tmp.name), args.config, args.seed, device, dtype)
        model_name = f"{args.config} config, random init (generated)"
    else:
        folder, model_name = resolve_folder(args.model), args.model
    with64 = dtype in (torch.float16, torch.bfloat16)  # the error budget needs the float64 twin

    report = Report(make_header(model=model_name, device=device, dtype=args.dtype, seed=args.seed, reference=reference))
    with torch.no_grad():
        for component in components:
            if not (folder / component).is_dir():
                raise SystemExit(f"pare parity: {folder} has no {component}/ folder; pass --components without it")
            if component == "unet":
                report.add("unet", unet_rows(reference, folder, device, dtype, args.seed, with64))
            elif component == "vae":
                report.add("vae", vae_rows(reference, folder, device, dtype, args.seed, with64))
            elif component == "scheduler":
                config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
                report.add("scheduler", scheduler_rows(reference, config, device=device, dtype=dtype, seed=args.seed))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if tmp is not None:
        tmp.cleanup()
    print(to_text(report))
    if args.out:
        for path in write(report, args.out):
            print(f"wrote {path}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a pipeline folder or Hub repo id (default: one made now, see --config)")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS),
                        help="without --model: the config of the random-init checkpoint made for the run (default tiny)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--components", default=",".join(COMPONENTS), help=f"comma list of {COMPONENTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-path", default=None, help="a diffusers source tree to import instead of the installed one")
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
