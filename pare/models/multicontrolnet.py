"""Several ControlNets at once (edges and depth, say): their residuals are summed.

diffusers twin: `models/controlnets/multicontrolnet.py` (`MultiControlNetModel`).
Source: ControlNet, Zhang et al. (arXiv 2302.05543), section 4.4 ("multiple conditions": the
outputs of several ControlNets are added to the UNet's skips together).
"""

from __future__ import annotations

import torch
from torch import nn

from .controlnet import ControlNetModel, ControlNetOutput


class MultiControlNetModel(nn.Module):
    """A list of ControlNets, each with its own condition image and scale; the residuals are summed.

    diffusers: `models/controlnets/multicontrolnet.py MultiControlNetModel`. The nets sit in `nets`
    (a ModuleList), as in diffusers, so the weights are named `nets.0.*`, `nets.1.*`.
    """

    def __init__(self, controlnets: list[ControlNetModel] | tuple[ControlNetModel, ...]):
        super().__init__()
        if not controlnets:
            raise ValueError("MultiControlNetModel needs at least one ControlNetModel")
        self.nets = nn.ModuleList(controlnets)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: list[torch.Tensor], conditioning_scale: list[float], guess_mode: bool = False,
                **kwargs) -> ControlNetOutput:
        """One condition image and one scale per net; other arguments as for `ControlNetModel.forward`."""
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"{len(self.nets)} ControlNets need as many condition images and scales, got "
                             f"{len(controlnet_cond)} images and {len(conditioning_scale)} scales")
        down, mid = None, None
        for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets):
            net_down, net_mid = net(sample, timestep, encoder_hidden_states, image, scale, guess_mode=guess_mode,
                                    **kwargs)
            if down is None:
                down, mid = net_down, net_mid
            else:
                down = [total + residual for total, residual in zip(down, net_down)]
                mid = mid + net_mid
        return ControlNetOutput(down, mid)

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.nets[0].device
