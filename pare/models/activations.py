"""Activation functions by name, as diffusers' configs spell them (`act_fn="silu"`).

diffusers twin: `models/activations.py` (`get_activation`).
"""

from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; pare knows {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
