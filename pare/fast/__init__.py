"""pare's fast path: the reference modules' forwards, rewritten for speed, beside them (never in them).

    import pare.fast
    pare.fast.optimize(pipe)      # or pipe.enable_fast(); pipe.disable_fast() goes back
    pare.fast.optimize(unet)      # one model: its blocks (no CUDA graph unless cuda_graph=True)

What it changes (optimize.py lists the swaps; each file says which reference module it replaces):
- channels-last weights and maps end to end, without the layout copies of the reference
  (transformer.py) and of PyTorch's NCHW GroupNorm (kernels/group_norm.py);
- GroupNorm + SiLU, with the ResNet's time-embedding add, in one Triton kernel (resnet.py);
- the GEGLU gate in one kernel (kernels/geglu.py);
- in the transformer blocks, each residual add done by the next LayerNorm's kernel (transformer.py,
  kernels/layer_norm.py);
- Q, K, V (or K, V) projections as one GEMM (attention.py), and every ResNet's time-embedding
  projection as one GEMM per call (time_projections.py);
- in pipelines on CUDA, the UNet replayed from CUDA graphs (graph.py), with no host sync per step.

The fast path is held to the parity suite's error budget (`pare parity --fast`, and the
`--fast` switch of the test suite). Measurements and what was tried: benchmarks/NOTES.md.
"""

from .kernels import triton_available
from .optimize import optimize, optimize_model, restore, restore_model

__all__ = ["optimize", "optimize_model", "restore", "restore_model", "triton_available"]
