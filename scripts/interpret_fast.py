"""The fast path with its real Triton kernels on the CPU, run by Triton's interpreter: a check for sessions
without a GPU. Each tiny model runs on the fast path and as the reference modules, on the same weights:

    float32: the relative difference between the two (the kernels' float32 sums reorder the reference's);
    float16: each one's relative error against the reference in float64 (err64), as the parity suite judges.

    TRITON_INTERPRET=1 python scripts/interpret_fast.py        # needs triton installed (CI's CPU wheel lacks it)

It is slow (the interpreter runs each program in Python), so the models are the tiny test configs.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (before Python starts), so that the kernels run on the CPU")

import pare.fast  # noqa: E402
from pare.configs import TINY_SD_UNET, TINY_SDXL_UNET, TINY_VAE  # noqa: E402
from pare.fast.kernels import triton_ready  # noqa: E402
from pare.models.autoencoder_kl import AutoencoderKL  # noqa: E402
from pare.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402


def unet_call(config: dict):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config["in_channels"], 8, 8, generator=g)
    text = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}

    def call(model, dtype):
        cast = lambda d: {k: (cast(v) if isinstance(v, dict) else v.to(dtype)) for k, v in d.items()}  # noqa: E731
        return model(x.to(dtype), torch.tensor(500), text.to(dtype), **cast(kwargs))
    return call


def vae_call(config: dict):
    z = torch.randn(1, config["latent_channels"], 8, 8, generator=torch.Generator().manual_seed(0))
    return lambda model, dtype: model.decode(z.to(dtype))


def check(name: str, model: torch.nn.Module, call) -> None:
    torch.manual_seed(0)
    for p in model.parameters():  # non-trivial norms and biases, so that a dropped or doubled term shows
        p.data += 0.05 * torch.randn_like(p)
    with torch.no_grad():
        ref32, fast32 = copy.deepcopy(model), pare.fast.optimize_model(copy.deepcopy(model))
        a, b = call(fast32, torch.float32), call(ref32, torch.float32)
        diff = float((a - b).norm() / b.norm())
        exact = call(copy.deepcopy(model).double(), torch.float64)
        ref16, fast16 = copy.deepcopy(model).half(), pare.fast.optimize_model(copy.deepcopy(model).half())
        err = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
        print(f"{name:<10} float32 relative difference {diff:.2e}   float16 err64: fast {err(call(fast16, torch.float16)):.3e}, "
              f"reference {err(call(ref16, torch.float16)):.3e}", flush=True)


def main() -> None:
    assert triton_ready(torch.zeros(1)), "Triton is not installed here"
    check("tiny-sd", UNet2DConditionModel.from_config(TINY_SD_UNET).eval(), unet_call(TINY_SD_UNET))
    check("tiny-sdxl", UNet2DConditionModel.from_config(TINY_SDXL_UNET).eval(), unet_call(TINY_SDXL_UNET))
    check("tiny-vae", AutoencoderKL.from_config(TINY_VAE).eval(), vae_call(TINY_VAE))


if __name__ == "__main__":
    main()
