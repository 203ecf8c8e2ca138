"""The `pare` command line.

    pare generate --model DIR_OR_HUB_ID --prompt "a photo of a cat" --out cat.png
                  [--negative-prompt TEXT] [--steps 50] [--guidance 7.5] [--seed 0]
                  [--height H] [--width W] [--scheduler DDIMScheduler]
                  [--image in.png --strength 0.8] [--device cuda] [--dtype fp16]
                  [--controlnet DIR --control-image edges.png [--controlnet-scale 1.0]]
                  [--image in.png --mask mask.png [--strength 1.0]]

    pare parity [--model DIR_OR_ID | --config tiny|tiny-sdxl|sd15|sd21|sdxl] [--device cuda] [--dtype fp16]
                [--components unet,vae,scheduler,pipeline] [--steps 50] [--seed N]
                [--reference-path DIFFUSERS_CHECKOUT] [--out REPORT]
    pare bench  [--models sd15,sd21,sdxl] [--cases ...] [--modes eager,graph,compile,compile-ro]

`generate` reads the folder's model_index.json to choose Stable Diffusion or SDXL (or the x4
upscaler), and runs image-to-image when `--image` is given, inpainting with `--mask` (white =
repaint), ControlNet with `--controlnet`. It shows a progress bar over the denoising steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pare", description="Stable Diffusion, one readable component at a time.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="text-to-image (or image-to-image with --image)",
                              description="Generate an image with a Stable Diffusion 1.x/2.x or SDXL pipeline folder.")
    gen.add_argument("--model", required=True, help="pipeline folder (diffusers layout) or Hub repo id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default 7.5, SDXL 5.0; <= 1 turns it off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the CPU generator (default: a random one, printed)")
    gen.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--scheduler", default=None, metavar="NAME",
                     help="scheduler class, e.g. DDIMScheduler, built from the folder's scheduler config "
                          "(default: the folder's own)")
    gen.add_argument("--image", default=None, help="input image: run image-to-image (SDEdit) from it")
    gen.add_argument("--strength", type=float, default=None, help="img2img: how much to change, in (0, 1]")
    gen.add_argument("--mask", default=None, help="inpainting: mask image for --image, white = repaint, black = keep")
    gen.add_argument("--controlnet", default=None, metavar="DIR",
                     help="ControlNet folder (diffusers layout) or Hub id; needs --control-image")
    gen.add_argument("--control-image", default=None, help="the ControlNet's condition image (edges, depth, ...)")
    gen.add_argument("--controlnet-scale", type=float, default=None, help="weight of the ControlNet (default 1.0)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    gen.add_argument("--out", default="out.png", help="where to write the PNG (default out.png)")
    gen.set_defaults(run=lambda args: generate(args, gen))

    from . import bench
    from .parity import run as parity

    par = commands.add_parser("parity", help="block-by-block parity report against diffusers",
                              description=parity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parity.add_arguments(par)
    par.set_defaults(run=lambda args: 0 if parity.run(args).passed else 1)  # exit 1 when a row fails

    ben = commands.add_parser("bench", help="latency and memory of pare beside diffusers",
                              description=bench.__doc__)
    bench.add_arguments(ben)
    ben.set_defaults(run=lambda args: [bench.run(args), 0][1])  # exit 0 once the files are written
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


def generate(args, parser) -> int:
    import torch

    from .pipelines.pipeline_utils import pipeline_root, read_model_index
    from .schedulers import SCHEDULERS, get_scheduler_class

    # 1. Check every argument before loading anything.
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        parser.error(f"--scheduler {args.scheduler!r} is not a pare scheduler; "
                     f"choose from {', '.join(sorted(SCHEDULERS))}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8, got {value}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.strength is not None and args.image is None:
        parser.error("--strength applies to image-to-image only: give --image too")
    for flag, path in (("--image", args.image), ("--mask", args.mask), ("--control-image", args.control_image)):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag} {path} does not exist")
    if args.mask is not None and args.image is None:
        parser.error("--mask is for inpainting: give the --image to inpaint too")
    if (args.controlnet is None) != (args.control_image is None):
        parser.error("--controlnet and --control-image go together: the ControlNet folder and its condition image")
    if args.controlnet_scale is not None and args.controlnet is None:
        parser.error("--controlnet-scale applies to --controlnet only")
    if args.controlnet is not None and args.image is not None:
        parser.error("--controlnet runs text-to-image: ControlNet with --image (img2img, inpainting) is not in pare")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]

    try:
        # 2. Load: the folder's model_index.json says which family it is.
        index = read_model_index(pipeline_root(args.model))
        pipeline_class = choose_pipeline(index.get("_class_name", ""), img2img=args.image is not None,
                                         inpaint=args.mask is not None, controlnet=args.controlnet is not None)
        named = (index.get("scheduler") or [None, None])[1]
        if args.scheduler is None and named is not None and named not in SCHEDULERS:
            raise ValueError(f"{args.model} names {named}, which pare does not implement; pass --scheduler with "
                             f"one of {', '.join(sorted(SCHEDULERS))} to build it from the folder's scheduler config")
        components = {}
        if args.scheduler is not None:
            from .loading import resolve_folder

            scheduler_folder = resolve_folder(args.model, "scheduler")
            components["scheduler"] = get_scheduler_class(args.scheduler).from_config(scheduler_folder)
        if args.controlnet is not None:
            from .models.controlnet import ControlNetModel

            components["controlnet"] = ControlNetModel.from_pretrained(args.controlnet, torch_dtype=dtype)
        pipe = pipeline_class.from_pretrained(args.model, torch_dtype=dtype, **components).to(device)

        # 3. Generate.
        seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      generator=torch.Generator("cpu").manual_seed(seed))
        if args.guidance is not None:
            kwargs["guidance_scale"] = args.guidance
        from PIL import Image

        if args.image is not None:
            kwargs["image"] = Image.open(args.image)
            if args.strength is not None:
                kwargs["strength"] = args.strength
        if args.mask is not None:
            kwargs["mask_image"] = Image.open(args.mask)
        if args.control_image is not None:
            kwargs["image"] = Image.open(args.control_image)
            if args.controlnet_scale is not None:
                kwargs["controlnet_conditioning_scale"] = args.controlnet_scale
        if args.image is None or args.mask is not None:
            kwargs.update(height=args.height, width=args.width)
        if pipeline_class.__name__ == "StableDiffusionUpscalePipeline" and "strength" in kwargs:
            raise ValueError("--strength does not apply to the x4 upscaler (it takes the image as it is)")
        image = pipe(**kwargs).images[0]
    except (ValueError, OSError) as e:  # bad folders, bad images, bad arguments: a message, not a traceback
        print(f"pare generate: error: {e}", file=sys.stderr)
        return 1

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height}, seed {seed}, {pipeline_class.__name__}, "
          f"{type(pipe.scheduler).__name__}, {args.steps} steps)")
    return 0


def choose_pipeline(class_name: str, img2img: bool, inpaint: bool = False, controlnet: bool = False):
    """model_index.json's `_class_name` -> pare's pipeline: SDXL if it names an XL pipeline, else SD."""
    from . import pipelines

    xl = "XL" in class_name
    if "Upscale" in class_name:
        if not img2img or inpaint or controlnet:
            raise ValueError(f"{class_name} upscales an image: give --image (and neither --mask nor --controlnet)")
        return pipelines.StableDiffusionUpscalePipeline
    if inpaint:
        return pipelines.StableDiffusionXLInpaintPipeline if xl else pipelines.StableDiffusionInpaintPipeline
    if controlnet:
        return pipelines.StableDiffusionXLControlNetPipeline if xl else pipelines.StableDiffusionControlNetPipeline
    if img2img:
        return pipelines.StableDiffusionXLImg2ImgPipeline if xl else pipelines.StableDiffusionImg2ImgPipeline
    return pipelines.StableDiffusionXLPipeline if xl else pipelines.StableDiffusionPipeline


if __name__ == "__main__":
    sys.exit(main())
