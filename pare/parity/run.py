"""`pare parity`: load one checkpoint into pare and diffusers, compare every block and step, name where they part.

    pare parity                                   # a tiny checkpoint made on the spot, CPU, fp32
    pare parity --reference-path ~/src/diffusers  # a diffusers working copy: did my edit move a block? (fp64)
    pare parity --config sdxl --device cuda --dtype fp16   # the official SDXL config, random init
    pare parity --model DIR_OR_ID --device cuda --dtype fp16 --out docs/parity/sd15-fp16

Every row has two views. *local*: pare's block (or scheduler step, or pipeline step) runs on
the very inputs diffusers' got, so the row measures that block's own error and is judged at
block tolerance; the first failing local row names the edited block. *accumulated*: each
side runs on its own upstream results, as in real use (the drift through depth), judged at
end-to-end tolerance. Below float32 both sides are also measured against a float64 copy of
diffusers and judged by the error budget of `pare/parity/tolerances.py`.

With --reference-path on the CPU the default precision is fp64: pare and diffusers then agree
to roundoff (today bit for bit), so an edit at float32's rounding level (an eps, a tanh GELU,
a scale off by 1e-6) stands out by orders of magnitude. Measured on the mutation suite
(parity_tests/mutations.py, README "Catching edits"): fp64 with block-local rows catches and
names every edit; fp32 misses those near its rounding level. --depth all names the module
(norm, attention, GEGLU, conv) inside the block.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..loading import resolve_folder
from .blocks import DEPTHS, block_names, compare_blocks
from .checkpoint import FAMILIES, make_checkpoint
from .compare import Row, compare
from .report import Report, make_header, to_text, write
from .scheduler_rows import scheduler_rows
from .tolerances import DTYPES

COMPONENTS = ("unet", "vae", "scheduler", "pipeline")  # the default run
EXTRA_COMPONENTS = ("controlnet",)  # on request: a ControlNet at the published config of --config's family
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


def _float64_twin(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=torch.float64)


def load_twins(reference, cls, folder, subfolder: str, device, dtype, single_file: Path | None = None):
    """pare's and diffusers' model from a diffusers folder, or each library's own loading of one original-layout
    file (`single_file`; `folder` then holds the configs, or None for pare's inference from the keys)."""
    theirs_cls = getattr(reference, cls.__name__)
    if single_file is None:
        ours = cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype, device=device)
        return ours, theirs_cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype).to(device).eval()
    config = {} if folder is None else {"config": str(folder), "subfolder": subfolder}
    ours = cls.from_single_file(single_file, torch_dtype=dtype, **config).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:  # diffusers is given the config pare inferred: the weights' loading is what is compared
            ours.save_config(Path(tmp) / subfolder)
            config = {"config": tmp, "subfolder": subfolder}
        theirs = theirs_cls.from_single_file(str(single_file), torch_dtype=dtype, local_files_only=True, **config)
    return ours, theirs.to(device).eval()


def fast_if(fast: bool, model: nn.Module) -> nn.Module:
    """--fast: pare's side runs its fast path (pare/fast/), held to the same tolerances."""
    if fast:
        from ..fast import optimize_model

        optimize_model(model)
    return model


def unet_rows(reference, folder, device, dtype, seed, with64, depth="blocks", single_file=None, fast=False):
    from ..models.unet_2d_condition import UNet2DConditionModel

    ours, theirs = load_twins(reference, UNet2DConditionModel, folder, "unet", device, dtype, single_file)
    fast_if(fast, ours)
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
    return compare_blocks(ours, theirs, args, kwargs, reference64=ref64, depth=depth).rows


def vae_rows(reference, folder, device, dtype, seed, with64, depth="blocks", single_file=None, fast=False):
    from ..models.autoencoder_kl import AutoencoderKL

    ours, theirs = load_twins(reference, AutoencoderKL, folder, "vae", device, dtype, single_file)
    fast_if(fast, ours)
    cfg = ours.config
    side = cfg.sample_size
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    g = torch.Generator(device).manual_seed(seed)
    z = torch.randn(1, cfg.latent_channels, side // factor, side // factor, generator=g, device=device).to(dtype)
    image = (torch.rand(1, cfg.in_channels, side, side, generator=g, device=device) * 2 - 1).to(dtype)
    rows = []
    for wrapper, stage, x in ((VAEEncode, "encoder", image), (VAEDecode, "decoder", z)):
        names = [f"vae.{stage}.{n}" for n in block_names(getattr(ours, stage), depth)]
        names += ["vae.quant_conv"] if stage == "encoder" and ours.quant_conv is not None else []
        names = (["vae.post_quant_conv"] if stage == "decoder" and ours.post_quant_conv is not None else []) + names
        ref64 = wrapper(_float64_twin(theirs, device)) if with64 else None
        rows += compare_blocks(wrapper(ours), wrapper(theirs), (x,), names=names, reference64=ref64).rows
    return rows


PROMPT = "a photograph of an astronaut riding a horse"


def _generate(pipe, noise: torch.Tensor, steps: int, seed: int, replay: list[torch.Tensor] | None = None
              ) -> list[tuple[str, torch.Tensor]]:
    """One text-to-image run; returns (row name, tensor): the UNet's text conditioning, the latents
    after every step (from the step callback), and the decoded image in [0, 1].

    With `replay` (the other library's latents after each step), each step's result is recorded
    and then replaced by replay's, so that every step starts from the other library's latents: a
    row then holds one step's own result (UNet, CFG, rescale, input scaling and scheduler step),
    and the image is this pipeline's decode of the other's final latents.
    """
    rows = []

    def conditioning(module, args, kwargs):  # the first UNet call's encoder_hidden_states: the prompt, encoded
        if not rows:
            context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            rows.append(("text conditioning (the UNet's encoder_hidden_states)", context.detach().clone()))

    def after_step(p, i, t, tensors):
        rows.append((f"latents after step {i + 1} (t={int(t)})", tensors["latents"].detach().clone()))
        return {} if replay is None else {"latents": replay[i].to(tensors["latents"].device, tensors["latents"].dtype)}

    handle = pipe.unet.register_forward_pre_hook(conditioning, with_kwargs=True)
    try:
        image = pipe(PROMPT, num_inference_steps=steps, latents=noise.to(pipe.device, pipe.dtype),
                     generator=torch.Generator().manual_seed(seed), output_type="pt", callback_on_step_end=after_step,
                     callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        handle.remove()
    return rows + [("image", image)]


def pipeline_rows(reference, folder, device, dtype, seed, with64, steps, scheduler=None, fast=False) -> list[Row]:
    """The whole text-to-image loop on both sides (prompt, seeded noise, CFG 7.5, `steps` steps), step by step.

    Each step is compared locally (pare's step from diffusers' latents, see `_generate`'s replay)
    and accumulated (pare's own trajectory). `scheduler`: the class (or web-UI sampler name) to run, built on both
    sides from the folder's scheduler config (default: the class the folder names).
    """
    import pare
    from ..schedulers import get_scheduler_class
    from ..schedulers.samplers import resolve

    index = json.loads((folder / "model_index.json").read_text())
    xl = "text_encoder_2" in index
    ours_cls = pare.StableDiffusionXLPipeline if xl else pare.StableDiffusionPipeline
    theirs_cls = reference.StableDiffusionXLPipeline if xl else reference.StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    name = scheduler or scheduler_config.get("_class_name")
    scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}

    sampler = resolve(name)  # a class, or a sampler name's class and options

    def load(cls, torch_dtype):
        scheduler = (get_scheduler_class(sampler.class_name) if cls is ours_cls
                     else getattr(reference, sampler.class_name)).from_config(scheduler_config, **sampler.options)
        pipe = cls.from_pretrained(folder, torch_dtype=torch_dtype, scheduler=scheduler,
                                   **(extra if cls is theirs_cls else {})).to(device)
        pipe.set_progress_bar_config(disable=True)
        if fast and cls is ours_cls:
            pipe.enable_fast()  # on CUDA its UNet replays CUDA graphs
        return pipe

    def free():  # one pipeline on the device at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()

    pipe = load(theirs_cls, dtype)
    side = pipe.unet.config.sample_size  # the model's native size, in latent pixels
    noise = torch.randn(1, pipe.vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(seed))
    theirs = _generate(pipe, noise, steps, seed)
    replay = [t for n, t in theirs if n.startswith("latents after step")]
    del pipe
    free()
    pipe = load(ours_cls, dtype)
    ours = _generate(pipe, noise, steps, seed)
    ours_local = _generate(pipe, noise, steps, seed, replay)
    del pipe
    free()
    exact = exact_local = None
    if with64:
        pipe = load(theirs_cls, torch.float64)
        exact = _generate(pipe, noise, steps, seed)
        exact_local = _generate(pipe, noise, steps, seed, replay)
        del pipe
        free()
    if [n for n, _ in ours] != [n for n, _ in theirs]:
        raise RuntimeError(f"the two pipelines ran differently: pare {[n for n, _ in ours]}, "
                           f"diffusers {[n for n, _ in theirs]}")
    rows = []
    for i, (label, theirs_out) in enumerate(theirs):
        if i == 0:
            label = f"{ours_cls.__name__} + {name}, {steps} steps: {label}"
        at = lambda run: None if run is None else run[i][1]  # noqa: E731
        local = compare(label, ours_local[i][1], theirs_out, at(exact_local), dtype=dtype, scope="block")
        accumulated = compare(label, ours[i][1], theirs_out, at(exact), dtype=dtype, scope="end_to_end")
        rows.append(Row(label, local, None if i == 0 else accumulated))  # the conditioning has no upstream
    return rows


def default_dtype(args: argparse.Namespace) -> str:
    """fp64 for a contributor's check on the CPU (`--reference-path`): the mode that catches subtle edits.

    In float64 pare and diffusers agree to about 1e-16 per block, so an edit at the rounding level
    of float32 (an eps, a tanh-approximate GELU, a scale off by 1e-6) stands out by orders of
    magnitude; the mutation suite (parity_tests/test_mutations.py) measures what each mode catches.
    """
    if args.dtype is not None:
        return args.dtype
    return "fp64" if args.reference_path is not None and args.device == "cpu" else "fp32"


def scheduler_names(args: argparse.Namespace, folder: Path) -> list[str]:
    """--schedulers: the folder's own scheduler (default), a comma list of class names (bare, or with options:
    "DPMSolverMultistepScheduler(solver_order=3)") or web-UI sampler names ("DPM++ 2M SDE Karras": a class and its
    options, `pare/schedulers/samplers.py`), or every class pare has."""
    from ..schedulers import SCHEDULERS
    from ..schedulers.samplers import resolve, split_names

    if args.schedulers is None:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return [config.get("_class_name", "DDIMScheduler")]
    names = sorted(SCHEDULERS) if args.schedulers == "all" else split_names(args.schedulers)
    for n in names:
        try:
            resolve(n)
        except ValueError as e:
            raise SystemExit(f"pare parity: --schedulers: {e}") from None
    return names


def run(args: argparse.Namespace) -> Report:
    """`pare parity`: the report, printed (and written with --out)."""
    report = make_report(args)
    print(to_text(report, verbose=args.verbose))
    if args.out:
        for path in write(report, args.out):
            print(f"wrote {path}")
    return report


def make_report(args: argparse.Namespace) -> Report:
    """The parity report for `args` (the namespace `add_arguments` parses), neither printed nor written:
    `pare parity` prints it, `pare sweep` gathers one per case."""
    from .reference import import_reference

    reference = import_reference(args.reference_path)
    args.dtype = default_dtype(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":  # parity in float32 means IEEE float32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    single_file = Path(args.model) if args.model is not None and Path(args.model).is_file() else None
    components = (args.components or ("unet,vae" if single_file is not None else ",".join(COMPONENTS))).split(",")
    unknown = [c for c in components if c not in COMPONENTS + EXTRA_COMPONENTS]
    if unknown:
        raise SystemExit(f"pare parity: unknown components {unknown}; expected some of "
                         f"{list(COMPONENTS + EXTRA_COMPONENTS)}")

    if single_file is not None and not set(components) <= {"unet", "vae"}:
        raise SystemExit(f"pare parity: --model {args.model} is a single checkpoint file: compare its loading with "
                         f"--components unet,vae (a pipeline or scheduler needs a diffusers folder)")
    if args.single_file_config is not None and single_file is None:
        raise SystemExit("pare parity: --single-file-config applies to a --model that is one checkpoint file")
    if "controlnet" in components:
        from .controlnet_checkpoint import FAMILY_CONTROLNETS

        if args.config not in FAMILY_CONTROLNETS:
            raise SystemExit(f"pare parity: no published ControlNet config for --config {args.config}; "
                             f"choose one of {sorted(FAMILY_CONTROLNETS)}")

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="pare-parity-")
        # Weights are stored in the run's precision (fp32 for fp32 runs), as an fp16 variant would be.
        folder = make_checkpoint(reference, Path(tmp.name), args.config, args.seed, device, dtype)
        model_name = f"{args.config} config, random init (generated)"
    elif single_file:
        folder, model_name = (None if args.single_file_config is None else resolve_folder(args.single_file_config),
                              f"{args.model} (single file, loaded by each library)")
    else:
        folder, model_name = resolve_folder(args.model), args.model
    with64 = dtype in (torch.float16, torch.bfloat16)  # the error budget needs the float64 twin
    depth = args.depth

    report = Report(make_header(model=model_name, device=device, dtype=args.dtype, seed=args.seed, reference=reference,
                                depth=depth))
    with torch.no_grad():
        for component in components:
            if component == "controlnet":
                from .controlnet_checkpoint import FAMILY_CONTROLNETS, controlnet_rows

                report.add("controlnet", controlnet_rows(reference, FAMILY_CONTROLNETS[args.config], device, dtype,
                                                         args.seed, with64, depth=depth, fast=args.fast))
                continue
            if single_file is not None:
                rows = unet_rows if component == "unet" else vae_rows
                report.add(component, rows(reference, folder, device, dtype, args.seed, with64, depth, single_file,
                                           args.fast))
                continue
            if not (folder / ("model_index.json" if component == "pipeline" else component)).exists():
                what = "model_index.json" if component == "pipeline" else f"{component}/ folder"
                raise SystemExit(f"pare parity: {folder} has no {what}; pass --components without {component}")
            if component == "unet":
                report.add("unet", unet_rows(reference, folder, device, dtype, args.seed, with64, depth, fast=args.fast))
            elif component == "vae":
                report.add("vae", vae_rows(reference, folder, device, dtype, args.seed, with64, depth, fast=args.fast))
            elif component == "scheduler":
                config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
                for name in scheduler_names(args, folder):
                    report.add("scheduler", scheduler_rows(reference, config, steps=args.steps, device=device,
                                                           dtype=dtype, seed=args.seed, name=name))
            elif component == "pipeline":
                for name in scheduler_names(args, folder):
                    report.add("pipeline", pipeline_rows(reference, folder, device, dtype, args.seed, with64,
                                                         args.steps, name, fast=args.fast))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if tmp is not None:
        tmp.cleanup()
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a pipeline folder or Hub repo id (default: one made now, see --config), or one "
                             "original-layout checkpoint file: each library then loads it with from_single_file "
                             "(--components unet,vae)")
    parser.add_argument("--single-file-config", default=None, metavar="DIR",
                        help="with a checkpoint file: the diffusers folder of its family, for both libraries' "
                             "configs (default: the config pare infers from the keys, given to diffusers too)")
    parser.add_argument("--config", default="tiny", choices=list(FAMILIES),
                        help="without --model: the config of the random-init checkpoint made for the run (default tiny)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="precision of both sides (default fp32; fp64 on the CPU with --reference-path, "
                             "the mode that catches the most edits: see the README's mutation table)")
    parser.add_argument("--depth", default="blocks", choices=DEPTHS,
                        help="blocks: stages, resnets, transformer blocks (default); all: every module down to "
                             "attention, GEGLU, norms, projections and convs")
    parser.add_argument("--components", default=None,
                        help=f"comma list of {COMPONENTS} (the default; unet,vae for a checkpoint file) and "
                             f"{EXTRA_COMPONENTS}")
    parser.add_argument("--schedulers", default=None, metavar="NAMES",
                        help="scheduler and pipeline rows for these classes (comma list, or 'all'), each built from "
                             "the folder's scheduler config (default: the class the folder names)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the scheduler and pipeline loops")
    parser.add_argument("--reference-path", default=None, help="a diffusers source tree to import instead of the installed one")
    parser.add_argument("--out", default=None, help="write OUT.md, OUT.json and OUT.png (the error against execution order)")
    parser.add_argument("--verbose", action="store_true", help="print every row (default: a summary and the worst rows)")
    parser.add_argument("--fast", action="store_true",
                        help="run pare's fast path (pare/fast/: fused kernels, channels last; in pipelines on CUDA the "
                             "UNet from CUDA graphs), held to the same tolerances and error budget")
