"""The UNet on the fast path: a CFG batch's text-free prefix run on one half; and the UNet replayed from CUDA graphs.

Replaces: `pare/models/unet_2d_condition.py UNet2DConditionModel.forward` (diffusers:
`models/unets/unet_2d_condition.py`).

Under classifier-free guidance (Ho & Salimans, arXiv 2207.12598) the UNet's batch is the latents twice, at one
timestep: `cat([latents] * 2)`, one half read with the negative prompt's text, the other with the prompt's. Until
the text first enters, at the first transformer's cross-attention, the two halves are the same computation: conv_in,
the first ResNet (its time embedding is the timestep's alone, the same in both halves) and the first transformer's
norm, projection and self-attention (over the image's own tokens). On SD 1.x and 2.x that prefix runs at the
UNet's largest map (64 x 64 for 512 px), where its self-attention is the costliest in the model. `same_halves=True`
runs it on one half and copies the result to both (`forward_halves`); from the cross-attention on, the batch is
whole. The caller promises that the halves are equal (nothing reads them to check): the fast loop of the fused
samplers (`denoise.py`) makes them so, since its step kernel writes both halves from one value.

The prefix is cut only where it is text-free: no class labels, no SDXL text_time embedding (its pooled text
enters the time embedding, so SDXL's first ResNet already differs between the halves), no masks, residuals or
other inputs, one timestep for the whole batch, and a first block that is a fast CrossAttnDownBlock2D. Any other
call runs the whole batch, as the reference does. At batch 1 cuDNN and cuBLAS may pick other kernels than at
batch 2, so the result is not the reference's to the bit, but within the same error budget (parity_tests).

`GraphedUNet2DConditionModel` replays this forward from CUDA graphs (graph.py's `GraphCache`; `same_halves` is
one more key of a graph).
"""

from __future__ import annotations

import functools

import torch

from ..models.unet_2d_blocks import CrossAttnDownBlock2D
from ..models.unet_2d_condition import UNet2DConditionModel
from ..validation import check_finite_inputs
from .graph import GraphCache, check_finite_once, replayable
from .resnet import FastResnetBlock2D
from .transformer import FastTransformer2DModel

SHARED_PREFIX = 1  # 0: same_halves is ignored, the whole batch runs every block (the A/B's switch)


class FastUNet2DConditionModel(UNet2DConditionModel):
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                same_halves: bool = False, **kwargs) -> torch.Tensor:
        """The reference forward; with `same_halves`, the promise that `sample` is one batch twice (a CFG batch at
        one timestep), so that the text-free prefix may run once (`forward_halves`) where `halvable`."""
        if same_halves and not args and self.halvable(sample, timestep, kwargs):
            return self.forward_halves(sample, timestep, encoder_hidden_states)
        return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def halvable(self, sample: torch.Tensor, timestep, kwargs: dict) -> bool:
        """Whether everything before the first cross-attention is the same in both halves, and fast blocks run it."""
        c = self.config
        first = self.down_blocks[0] if len(self.down_blocks) else None
        return bool(SHARED_PREFIX and sample.ndim == 4 and sample.shape[0] % 2 == 0 and not self.training
                    and (not torch.is_tensor(timestep) or timestep.numel() == 1)  # one timestep for the batch
                    and all(v is None or (isinstance(v, dict) and not v) for v in kwargs.values())  # only text
                    and not c.center_input_sample and self.class_embedding is None
                    and c.addition_embed_type is None and self.encoder_hid_proj is None
                    and type(first) is CrossAttnDownBlock2D and isinstance(first.resnets[0], FastResnetBlock2D)
                    and isinstance(first.attentions[0], FastTransformer2DModel) and first.attentions[0].halvable())

    def forward_halves(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The reference forward's steps on a CFG batch (sample: (2B, C, H, W), its halves equal), the text-free
        prefix on one half. Only the plain SD path (`halvable`), so steps 1 to 6 are the reference's without the
        branches for inputs it does not take."""
        check_finite_inputs(type(self).__name__, timestep=timestep, encoder_hidden_states=encoder_hidden_states)
        timesteps = self._check_inputs(sample, timestep, encoder_hidden_states, None, None)  # (2B,), all one value
        b = sample.shape[0] // 2
        text = dict(encoder_hidden_states=encoder_hidden_states)
        forward_upsample_size = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])

        # 1. time: one timestep, so one embedding in both halves
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))  # (2B, time_embed_dim)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # 2. in, and 3. the first down block, its text-free prefix on one half
        first = self.down_blocks[0]
        s0 = self.conv_in(sample[:b])  # (B, C0, H, W)
        h = first.resnets[0](s0, emb[:b])  # (B, C0, H, W)
        h = first.attentions[0](h, halves=True, **text)  # self-attention on B, then both halves: (2B, C0, H, W)
        skips = (torch.cat([s0, s0]), h)  # (2B, C0, H, W) each; cat keeps the channels-last layout, repeat would not
        for resnet, attn in zip(first.resnets[1:], first.attentions[1:]):
            h = attn(resnet(h, emb), **text)
            skips += (h,)
        if first.downsamplers is not None:
            h = first.downsamplers[0](h)  # (2B, C0, H/2, W/2)
            skips += (h,)
        for block in self.down_blocks[1:]:
            h, states = block(h, emb, **text) if block.has_cross_attention else block(h, emb)
            skips += states

        # 4. mid
        if self.mid_block is not None:
            h = self.mid_block(h, emb, **text)

        # 5. up
        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            n_skips = len(block.resnets)
            res_samples, skips = skips[-n_skips:], skips[:-n_skips]
            if forward_upsample_size and i < len(self.up_blocks) - 1:
                upsample_size = skips[-1].shape[2:]
            if block.has_cross_attention:
                h = block(h, res_samples, emb, upsample_size=upsample_size, **text)
            else:
                h = block(h, res_samples, emb, upsample_size)

        # 6. out
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (2B, out_channels, H, W)


class GraphedUNet2DConditionModel(FastUNet2DConditionModel):
    """The fast UNet, replayed from CUDA graphs where it can be (CUDA, no autograd); eager elsewhere.

    Replaces: `UNet2DConditionModel.forward` inside a pipeline's loop, on CUDA (graph.py says why and how)."""

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        eager = functools.partial(FastUNet2DConditionModel.forward, self)
        if not replayable(sample):
            return eager(sample, timestep, encoder_hidden_states, **kwargs)
        check_finite_once(self, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          timestep_cond=kwargs.get("timestep_cond"), **(kwargs.get("added_cond_kwargs") or {}))
        if not torch.is_tensor(timestep):  # a Python number would be baked into the graph: make it an input
            timestep = torch.tensor(timestep)
        timestep = timestep.to(sample.device)
        if "_pare_graphs" not in self.__dict__:
            self.__dict__["_pare_graphs"] = GraphCache(eager, self)
        return self.__dict__["_pare_graphs"](sample=sample, timestep=timestep,
                                             encoder_hidden_states=encoder_hidden_states, **kwargs)
