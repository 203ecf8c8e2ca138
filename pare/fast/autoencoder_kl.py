"""The VAE on the fast path: its input's finite check read back after the decoder (or encoder) is queued, not before.

Replaces: `pare/models/autoencoder_kl.py AutoencoderKL.decode` and `.encode` (diffusers:
`models/autoencoders/autoencoder_kl.py`), which refuse NaN or inf inputs before any work (`_check_finite`).

The reference counts its input's non-finite values first, and that count is read on the host: the CPU waits until
the GPU has run everything queued. In a pipeline, what is queued is the whole denoising loop; so the decoder's launch
waits for the loop's last step, and then the GPU idles while the host walks to the decoder's replay (its graph's
checks, the copy in). Here the count stays on the GPU until the decode is queued behind it, and only then is read:
the decoder runs straight after the loop. The check is the same one, with the same error: a non-finite input still
raises before `decode` returns, its decoded image discarded (the GPU's work on it is wasted, nothing else).
benchmarks/NOTES.md change 48 has what it saves.
"""

from __future__ import annotations

import torch

from ..models.autoencoder_kl import AutoencoderKL, _tracing, count_nonfinite, refuse_nonfinite


class FastAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose `decode` and `encode` read their input's finite check once their work is queued."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._then_check(super().decode, z)

    def encode(self, x: torch.Tensor):
        return self._then_check(super().encode, x)

    def _then_check(self, method, x: torch.Tensor):
        self.__dict__["_pare_pending"] = None
        try:
            out = method(x)  # its `_check_finite` (below) queues the count, unread
        finally:
            pending = self.__dict__.pop("_pare_pending")
        if pending is not None:
            count, numel, name, what = pending
            refuse_nonfinite(int(count), numel, name, what)  # the host read: the work is queued by now
        return out

    def _check_finite(self, x: torch.Tensor, method: str, what: str) -> None:
        if _tracing(x) or "_pare_pending" not in self.__dict__:  # called from elsewhere: the reference's check
            return super()._check_finite(x, method, what)
        self.__dict__["_pare_pending"] = (count_nonfinite(x), x.numel(), method, what)  # a 0-d tensor on x's device
