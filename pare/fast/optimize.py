"""Switch a pipeline or model to the fast path, and back: the same modules and weights, faster forwards.

Each reference class is swapped for its fast subclass (`module.__class__`), so names, weights,
`isinstance` checks and the state dict stay as they were, and `restore` swaps them back:

    ResnetBlock2D       -> FastResnetBlock2D        (resnet.py: GroupNorm+SiLU kernels)
    Attention           -> FastAttention            (attention.py: one QKV / KV GEMM)
    GEGLU               -> FastGEGLU                (transformer.py: the gate in its projection's GEMM)
    Transformer2DModel  -> FastTransformer2DModel   (transformer.py: channels last, no copies; its blocks'
                                                     cross-attention K, V in one GEMM, or the whole
                                                     model's in one where small: `share_context`)
    BasicTransformerBlock -> FastBasicTransformerBlock (transformer.py: residual add + LayerNorm kernels)
    nn.GroupNorm        -> FastGroupNorm            (norm.py)
    Upsample2D          -> FastUpsample2D           (resampling.py: upsampling and its conv as one
                                                     sub-pixel conv, 16 taps for 36)
    UpBlock2D, CrossAttnUpBlock2D -> FastUpBlock2D, FastCrossAttnUpBlock2D (unet_blocks.py: the skip
                                                     concatenations by a copy kernel)
    Timesteps           -> FastTimesteps            (embeddings.py: the sinusoidal features in one kernel)
    UNet2DConditionModel -> FastUNet2DConditionModel (unet.py: a CFG batch's text-free prefix on one half, where
                                                     the caller says the halves are equal: `same_halves=True`)
                         -> GraphedUNet2DConditionModel (unet.py, graph.py; CUDA, in pipelines, `cuda_graph=True`)
    AutoencoderKL       -> FastAutoencoderKL        (autoencoder_kl.py: the input's finite check read once the
                                                     decode is queued, so a pipeline's decoder follows its loop)
    pipeline.denoise     -> one CUDA graph for the whole loop (loop.py; CUDA, in pipelines, `loop_graph=True`)
                            a DDIM, Euler, Euler a or DPM-Solver++ step's guidance and update in one kernel (denoise.py)
                            a stochastic sampler's noise drawn ahead of each replay (noise.py)
    pipeline.encode_prompt -> the prompt and its negative in one text-encoder call (prompt.py; where the text
                            encoder replays graphs)

plus every ResNet's time-embedding projection of a model in one GEMM (time_projections.py),
and the weights of every model go channels last (cuDNN's fast convolution layout on recent GPUs).
In a pipeline on CUDA, the text encoders and the VAE's encoder and decoder, each called once per
image, replay CUDA graphs too (graph.py `graph_forward`; the text encoders keep transformers' kernels).
On the CPU, or without Triton, the kernels run their PyTorch twins: the same function, the same
module tree, no speed-up promised.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.attention import Attention
from ..models.autoencoder_kl import AutoencoderKL
from ..models.embeddings import Timesteps
from ..models.resampling import Upsample2D
from ..models.resnet import ResnetBlock2D
from ..models.transformer import GEGLU, BasicTransformerBlock, Transformer2DModel
from ..models.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from ..models.unet_2d_condition import UNet2DConditionModel
from . import time_projections
from .attention import FastAttention
from .autoencoder_kl import FastAutoencoderKL
from .embeddings import FastTimesteps
from .graph import eager_forward, graph_forward, share_pool
from .loop import graph_denoise, step_denoise
from .norm import FastGroupNorm
from .prompt import encode_apart, encode_together, one_clip_call_each
from .resampling import FastUpsample2D
from .resnet import FastResnetBlock2D
from .transformer import MODEL_STACK_MAX, FastBasicTransformerBlock, FastGEGLU, FastTransformer2DModel, stack_context
from .unet import FastUNet2DConditionModel, GraphedUNet2DConditionModel
from .unet_blocks import FastCrossAttnUpBlock2D, FastUpBlock2D

SWAPS = {
    ResnetBlock2D: FastResnetBlock2D,
    Attention: FastAttention,
    GEGLU: FastGEGLU,
    Transformer2DModel: FastTransformer2DModel,
    BasicTransformerBlock: FastBasicTransformerBlock,
    nn.GroupNorm: FastGroupNorm,
    Upsample2D: FastUpsample2D,
    UpBlock2D: FastUpBlock2D,
    CrossAttnUpBlock2D: FastCrossAttnUpBlock2D,
    Timesteps: FastTimesteps,
    UNet2DConditionModel: FastUNet2DConditionModel,
    AutoencoderKL: FastAutoencoderKL,
}
MODEL_NAMES = ("unet", "vae", "controlnet")  # the pipeline components that get the fast path
ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # replayed from graphs in a pipeline; their kernels stay


def optimize_model(model: nn.Module, *, channels_last: bool = True, cuda_graph: bool = False) -> nn.Module:
    """Swap `model`'s blocks for their fast twins in place; return the model."""
    if channels_last:  # first: the fused attention weights below must be the final tensors
        model.to(memory_format=torch.channels_last)
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
            if fast is FastAttention:
                module.fuse()
    time_projections.attach(model, [m for m in model.modules() if isinstance(m, FastResnetBlock2D)])
    share_context(model)  # after the attentions: their K, V become views of the stacks
    if cuda_graph and type(model) in (FastUNet2DConditionModel, GraphedUNet2DConditionModel):
        model.__class__ = GraphedUNet2DConditionModel
        model.__dict__.pop("_pare_graphs", None)  # a new cache: the graphs of an earlier optimize may be stale
    return model


def share_context(model: nn.Module) -> None:
    """Stack the text's K, V weights of all the model's transformers into one matrix where its K, V output
    (77 tokens x MODEL_STACK_MAX columns at most) is small (SD1.x, SD2.x); else one stack per transformer (SDXL:
    one for all its 70 blocks would hold 51 MB through the call). A model-wide stack is projected by the first
    transformer a call runs: UNets and ControlNets run down_blocks, mid_block, up_blocks in that order."""
    transformers = [m for m in model.modules() if isinstance(m, FastTransformer2DModel)]
    parts = [getattr(model, name, None) for name in ("down_blocks", "mid_block", "up_blocks")]
    ordered = [m for part in parts if isinstance(part, nn.Module) for m in part.modules()
               if isinstance(m, FastTransformer2DModel)]
    width = sum(2 * b.attn2.inner_dim for t in ordered for b in t.transformer_blocks if b.attn2 is not None)
    shared = ordered if ordered and width <= MODEL_STACK_MAX else []
    stack_context(shared)
    for t in transformers:
        if t not in shared:
            t.fuse()


def restore_model(model: nn.Module) -> nn.Module:
    """Swap the fast twins back for the reference classes (the weights stay where they are)."""
    back = {fast: ref for ref, fast in SWAPS.items()}
    back[GraphedUNet2DConditionModel] = UNet2DConditionModel
    for module in model.modules():
        if type(module) in back:
            module.__class__ = back[type(module)]
    model.__dict__.pop("_pare_graphs", None)
    model.__dict__.pop("_pare_pool", None)
    time_projections.detach(model)
    model.to(memory_format=torch.contiguous_format)
    return model


def _models(obj) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        return [obj]
    found = [getattr(obj, name, None) for name in MODEL_NAMES]
    models = [m for m in found if isinstance(m, nn.Module)]
    if not models:
        raise TypeError(f"pare.fast: {type(obj).__name__} is neither a torch module nor a pipeline with "
                        f"{' / '.join(MODEL_NAMES)} components")
    return models


def optimize(obj, *, channels_last: bool = True, cuda_graph: bool | None = None, loop_graph: bool | None = None):
    """The fast path for a pipeline (its UNet, VAE and ControlNet) or one model; returns `obj`.

    `cuda_graph` (default: on for a pipeline's UNet on CUDA) replays the UNet from CUDA graphs, and the
    once-per-image modules (text encoders, VAE encoder and decoder) too.
    `loop_graph` (default: as `cuda_graph` is for the UNet) replays the whole denoising loop from one graph.
    """
    pipeline = not isinstance(obj, nn.Module)
    for model in _models(obj):
        on_cuda = next(model.parameters()).is_cuda
        graph = (pipeline and on_cuda) if cuda_graph is None else cuda_graph
        optimize_model(model, channels_last=channels_last, cuda_graph=graph)
    if pipeline:
        step_denoise(obj)  # a new cache, as below
        unet = getattr(obj, "unet", None)
        on_cuda = isinstance(unet, nn.Module) and next(unet.parameters()).is_cuda
        default = on_cuda if cuda_graph is None else cuda_graph  # as for the UNet's graphs
        if default if loop_graph is None else loop_graph:
            graph_denoise(obj)
        graphed = []
        for module in _once_per_image(obj):
            graph = next(module.parameters()).is_cuda if cuda_graph is None else cuda_graph
            eager_forward(module)  # a new cache: the graphs of an earlier optimize may be stale
            if graph:
                graph_forward(module)
                graphed.append(module)
        encode_apart(obj)
        if getattr(obj, "text_encoder", None) in graphed and one_clip_call_each(obj):
            encode_together(obj)  # the prompt and its negative in one replay
        graphed += [m for m in _models(obj) if isinstance(m, GraphedUNet2DConditionModel)]
        if len(graphed) > 1 and torch.cuda.is_available():
            share_pool(graphed)  # called one at a time: their graphs can share their transient memory
    return obj


def restore(obj):
    for model in _models(obj):
        restore_model(model)
    if not isinstance(obj, nn.Module):
        step_denoise(obj)
        encode_apart(obj)
        for module in _once_per_image(obj):
            eager_forward(module)
    return obj


def _once_per_image(pipe) -> list[nn.Module]:
    """The modules a pipeline calls once per image (not per step): text encoders, the VAE's encoder and decoder."""
    vae = getattr(pipe, "vae", None)
    found = [getattr(pipe, name, None) for name in ENCODER_NAMES]
    found += [getattr(vae, name, None) for name in ("encoder", "decoder")]
    return [m for m in found if isinstance(m, nn.Module) and next(m.parameters(), None) is not None]
