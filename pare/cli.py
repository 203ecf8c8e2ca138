"""The `pare` command line.

    pare generate --model DIR_OR_HUB_ID_OR_FILE --prompt "a photo of a cat" --out cat.png
                  [--config DIR_OR_ID] [--lora FILE[:SCALE] ...] [--allow-pickle]
                  [--negative-prompt TEXT] [--steps 50] [--guidance 7.5] [--seed 0]
                  [--height H] [--width W] [--sampler "DPM++ 2M Karras" | --scheduler EulerDiscreteScheduler] [--fast]
                  [--image in.png --strength 0.8] [--device cuda] [--dtype fp16]
                  [--controlnet DIR --control-image edges.png [--controlnet-scale 1.0]]
                  [--image in.png --mask mask.png [--strength 1.0]]
    pare generate --model DIR --prompts prompts.jsonl --out images/ [--batch-size 4] [--seed 0] [--timeout 1800]
                  (one image per prompt, resumable; under torchrun the batches are shared across the ranks)

    pare parity [--model DIR_OR_ID | --config tiny|tiny-sdxl|sd15|sd21|sdxl] [--device cuda] [--dtype fp16] [--fast]
                [--components unet,vae,scheduler,pipeline] [--steps 50] [--seed N]
                [--reference-path DIFFUSERS_CHECKOUT] [--out REPORT]
    pare sweep  [SPEC.toml] [--configs tiny,sdxl] [--dtypes fp16,bf16] [--seeds 0,1] [--schedulers all]
                [--components unet,vae,scheduler,pipeline] [--fast] [--out REPORT] [--timeout 1800]
                (serially, or one rank per GPU: torchrun --nproc-per-node N -m pare.cli sweep ...)
    pare bench  [--models sd15,sd21,sdxl] [--cases ...] [--modes eager,graph,compile,compile-ro,compile-graph,fast]

`generate` reads the folder's model_index.json to choose Stable Diffusion or SDXL (or the x4
upscaler), and runs image-to-image when `--image` is given, inpainting with `--mask` (white =
repaint), ControlNet with `--controlnet`. It runs the scheduler the folder names, unless
`--scheduler` (a class name) or `--sampler` (a web-UI name, `pare/schedulers/samplers.py`) picks
another, built from the folder's scheduler config. It shows a progress bar over the denoising steps.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pare", description="Stable Diffusion, one readable component at a time.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .schedulers import SCHEDULER_MODULES
    from .schedulers.samplers import table

    gen = commands.add_parser("generate", help="text-to-image (or image-to-image with --image)",
                              description="Generate an image with a Stable Diffusion 1.x/2.x or SDXL pipeline folder.",
                              epilog=f"samplers (--sampler NAME: the scheduler class and options it sets on top of "
                                     f"the folder's scheduler config):\n{table()}\n\n"
                                     f"schedulers (--scheduler NAME):\n"
                                     + textwrap.fill(", ".join(SCHEDULER_MODULES), initial_indent="  ",
                                                     subsequent_indent="  "),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--model", required=True,
                     help="pipeline folder (diffusers layout), Hub repo id, or one original-layout checkpoint file "
                          "(.safetensors; .ckpt only with --allow-pickle)")
    gen.add_argument("--config", default=None, metavar="DIR_OR_ID",
                     help="with a checkpoint file: the diffusers folder (or Hub id) of its family, for the tokenizer "
                          "and scheduler (default: the family's diffusers repo, as in diffusers' from_single_file)")
    gen.add_argument("--allow-pickle", action="store_true", help="let --model / --lora read pickle files (.ckpt)")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="a LoRA to apply, at SCALE (default 1); repeat for several")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt of one image")
    what.add_argument("--prompts", default=None, metavar="FILE",
                      help="a prompt file: one prompt per line, or JSON lines (.jsonl) with per-prompt seed, height, "
                           "width and negative_prompt; one image per prompt into the --out folder, resumable, "
                           "shared across ranks under torchrun")
    gen.add_argument("--negative-prompt", default=None, help="with --prompts: for the prompts without their own")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default 7.5, SDXL 5.0; <= 1 turns it off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the CPU generator (default: a random one, printed); with --prompts, prompt i "
                          "without a seed gets SEED + i (default 0 + i)")
    gen.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    gen.add_argument("--width", type=int, default=None)
    choice = gen.add_mutually_exclusive_group()
    choice.add_argument("--scheduler", default=None, metavar="NAME",
                        help="scheduler class, e.g. EulerDiscreteScheduler, built from the folder's scheduler config "
                             "(default: the folder's own; the list is below)")
    choice.add_argument("--sampler", default=None, metavar="NAME",
                        help='web-UI sampler name, e.g. "Euler a" or "DPM++ 2M Karras": a scheduler class and '
                             "options, on top of the folder's scheduler config (the table is below)")
    gen.add_argument("--image", default=None, help="input image: run image-to-image (SDEdit) from it")
    gen.add_argument("--strength", type=float, default=None, help="img2img: how much to change, in (0, 1]")
    gen.add_argument("--mask", default=None, help="inpainting: mask image for --image, white = repaint, black = keep")
    gen.add_argument("--controlnet", default=None, metavar="DIR",
                     help="ControlNet folder (diffusers layout) or Hub id; needs --control-image")
    gen.add_argument("--control-image", default=None, help="the ControlNet's condition image (edges, depth, ...)")
    gen.add_argument("--controlnet-scale", type=float, default=None, help="weight of the ControlNet (default 1.0)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    gen.add_argument("--fast", action="store_true",
                     help="pare's fast path (pare/fast/: fused Triton kernels, channels last, the UNet from CUDA "
                          "graphs); held to the same error budget, see the README")
    gen.add_argument("--out", default=None,
                     help="where to write the PNG (default out.png); with --prompts, the folder (default out/)")
    gen.add_argument("--batch-size", type=int, default=1,
                     help="with --prompts: images per pipeline call (prompts of one size and negative-prompt "
                          "presence share a batch; default 1)")
    gen.add_argument("--timeout", type=float, default=1800.0,
                     help="with --prompts under torchrun: seconds a finished rank waits for the others (default 1800)")
    gen.set_defaults(run=lambda args: generate(args, gen))

    from . import bench
    from .parity import run as parity

    par = commands.add_parser("parity", help="block-by-block parity report against diffusers",
                              description=parity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parity.add_arguments(par)
    par.set_defaults(run=lambda args: 0 if parity.run(args).passed else 1)  # exit 1 when a row fails

    from .sweep import run as sweep

    swp = commands.add_parser("sweep", help="parity over configs x dtypes x seeds x schedulers, sharded with torchrun",
                              description=sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_arguments(swp)
    swp.set_defaults(run=lambda args: sweep.run(args, swp))  # exit 1 when a case fails

    ben = commands.add_parser("bench", help="latency and memory of pare beside diffusers",
                              description=bench.__doc__)
    bench.add_arguments(ben)
    ben.set_defaults(run=lambda args: [bench.run(args), 0][1])  # exit 0 once the files are written
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 a usage error (argparse's), 1 a runtime error, printed as
    one line `pare <cmd>: error: ...` without a traceback; `--debug` (anywhere) shows the traceback."""
    import math

    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # accepted after the command too: `pare generate ... --debug`
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    args = parser.parse_args(argv)
    for name, value in vars(args).items():  # argparse's float() takes "nan" and "inf"
        if isinstance(value, float) and not math.isfinite(value):
            usage_error(args, f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.command == "generate" and args.prompts is not None:
        args.out = args.out or "out"
        if Path(args.out).is_file() or Path(args.out).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            usage_error(args, f"--out {args.out}: with --prompts, --out is the folder the images go to")
    elif args.command == "generate":
        from PIL import Image

        args.out = args.out or "out.png"
        out = Path(args.out)
        if out.is_dir():
            usage_error(args, f"--out {out} is a directory: give the image's file name, e.g. {out / 'out.png'}")
        if out.suffix.lower() not in Image.registered_extensions():
            usage_error(args, f"--out {out}: PIL cannot tell an image format from the extension {out.suffix!r}; "
                         f"use .png (or .jpg, .webp, ...)")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"pare {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback is for --debug
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"pare {args.command}: error: {message}", file=sys.stderr)
        return 1


def usage_error(args, message: str):
    """argparse's convention for a bad argument: one line on stderr, exit code 2."""
    print(f"pare {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def generate(args, parser) -> int:
    import torch

    from .atomic import write_atomically
    from .pipelines.pipeline_utils import pipeline_root, read_model_index
    from .schedulers import SCHEDULERS, get_scheduler_class
    from .schedulers.samplers import get_sampler

    # 1. Check every argument before loading anything.
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        parser.error(f"--scheduler {args.scheduler!r} is not a pare scheduler; "
                     f"choose from {', '.join(sorted(SCHEDULERS))}")
    if args.sampler is not None:
        try:
            sampler = get_sampler(args.sampler)
        except ValueError as e:
            parser.error(f"--sampler: {e}")
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
    loras = [parse_lora(spec) for spec in args.lora]
    for path, _ in loras:
        if not Path(path).exists():
            parser.error(f"--lora {path} does not exist")
    if args.prompts is not None:
        prompts = check_prompts_arguments(args, parser)
    elif args.batch_size != 1:
        parser.error("--batch-size applies to --prompts only")
    if args.prompts is not None:  # under torchrun: join the ranks, take the GPU of LOCAL_RANK
        from . import distributed

        world, device = distributed.init(args.device, args.timeout)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]

    # Errors from here on (bad folders, images, arguments) reach main(): one line, or the traceback with --debug.
    # 2. Load: the folder's model_index.json says which family it is; a single file, its keys.
    single_file = Path(args.model).is_file()
    if single_file:
        from .single_file import detect_family, read_checkpoint

        family = detect_family(read_checkpoint(args.model, args.allow_pickle)[0], args.model)
        config_root = pipeline_root(args.config or family.default_repo)
        class_name = "StableDiffusionXLPipeline" if family.sdxl else "StableDiffusionPipeline"
    elif args.config is not None:
        parser.error("--config applies to a single checkpoint file only; --model is a folder or repo id")
    else:
        config_root = pipeline_root(args.model)
        class_name = None
    index = read_model_index(config_root)
    pipeline_class = choose_pipeline(class_name or index.get("_class_name", ""), img2img=args.image is not None,
                                     inpaint=args.mask is not None, controlnet=args.controlnet is not None)
    named = (index.get("scheduler") or [None, None])[1]
    if args.scheduler is None and args.sampler is None and named is not None and named not in SCHEDULERS:
        raise ValueError(f"{args.model} names {named}, which pare does not implement; pass --sampler or "
                         f"--scheduler (one of {', '.join(sorted(SCHEDULERS))}) to build another from the "
                         f"folder's scheduler config")
    components = {}
    if args.scheduler is not None or args.sampler is not None:
        from .loading import resolve_folder

        scheduler_folder = resolve_folder(config_root if single_file else args.model, "scheduler")
        if args.sampler is not None:
            options = sampler.options
            scheduler_class = get_scheduler_class(sampler.class_name)
        else:
            options, scheduler_class = {}, get_scheduler_class(args.scheduler)
        components["scheduler"] = scheduler_class.from_config(scheduler_folder, **options)
    if args.controlnet is not None:
        from .models.controlnet import ControlNetModel

        components["controlnet"] = ControlNetModel.from_pretrained(args.controlnet, torch_dtype=dtype)
    if single_file:
        pipe = pipeline_class.from_single_file(args.model, config=str(config_root), torch_dtype=dtype,
                                               allow_pickle=args.allow_pickle, **components).to(device)
    else:
        pipe = pipeline_class.from_pretrained(args.model, torch_dtype=dtype, **components).to(device)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}", allow_pickle=args.allow_pickle)
    if loras:
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], [scale for _, scale in loras])
    if args.fast:
        pipe.enable_fast()  # pare/fast/: the same images to the fp16 budget, faster on CUDA

    # 3. Generate.
    if args.prompts is not None:
        from .batch_generate import generate_prompts

        try:
            return generate_prompts(args, pipe, prompts, world, Path(args.out))
        finally:
            distributed.shutdown(world)
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

    out = write_atomically(args.out, image.save)  # temporary file, then rename: never a half-written PNG
    sampler = f" (sampler {args.sampler!r})" if args.sampler is not None else ""
    print(f"wrote {out} ({image.width}x{image.height}, seed {seed}, {pipeline_class.__name__}, "
          f"{type(pipe.scheduler).__name__}{sampler}, {args.steps} steps)")
    return 0


def check_prompts_arguments(args, parser) -> list:
    """`--prompts`: the flags it takes, and the prompt file read (a bad file is a usage error, naming its line)."""
    from .prompts import read_prompts

    for flag, value in (("--image", args.image), ("--mask", args.mask), ("--controlnet", args.controlnet)):
        if value is not None:
            parser.error(f"--prompts runs text-to-image: {flag} is for one image (--prompt)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive (seconds), got {args.timeout:g}")
    try:
        return read_prompts(args.prompts, 0 if args.seed is None else args.seed, args.height, args.width,
                            args.negative_prompt)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def parse_lora(spec: str) -> tuple[str, float]:
    """`file.safetensors` -> (file, 1.0); `file.safetensors:0.6` -> (file, 0.6)."""
    path, sep, scale = spec.rpartition(":")
    if sep and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


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
