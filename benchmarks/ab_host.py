"""A/B of the fast image's host-side changes, in one run (benchmarks/NOTES.md changes 48 and 49):

- the prompt and its negative in one text-encoder call (pare/fast/prompt.py), or in two (the reference's);
- the VAE's input check read after the decoder is queued (pare/fast/autoencoder_kl.py), or before (the reference's);
- the schedule's host copy kept by `set_timesteps` (pare/schedulers/scheduling_utils.py `to_device`), or the timesteps
  copied in by a blocking `.to(device)` and read back for the loop's key (as before change 49);
- all, each one off, and none. Timed in alternating rounds, so the ratios are fair (same machine, clocks, weights).

And the host cost of a GraphCache call's checks (pare/fast/graph.py: a swapped submodule, hooks, moved weights) on
the fast pipeline's UNet loop, VAE decoder and text encoder: as `map`s over C functions (now) and as the Python
loops they replaced (written out here, as they were).

    python benchmarks/ab_host.py --model sd15 --steps 50 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def loop_checks(cache) -> None:
    """GraphCache's per-call checks as Python loops, as they were before change 48."""
    parents, names, children = cache.links
    any(parent.get(name) is not child for parent, name, child in zip(parents, names, children))
    any(m._forward_hooks or m._forward_pre_hooks for m in cache.inner)
    data_ptr = lambda p: 0 if p is None else p.data_ptr()  # noqa: E731
    owners, slots = cache.slots
    hash((tuple(data_ptr(d.get(n)) for d, n in zip(owners, slots)), owners[0][slots[0]].dtype))


def mapped_checks(cache) -> None:
    cache.moved(), cache.hooked(), cache.weights()


def plain_to_device(values: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`to_device` as it was before change 49: a blocking copy in, no host copy kept."""
    values = values if dtype is None else values.to(dtype)
    return values if device is None else values.to(device)


def keep_host_schedule(on: bool) -> None:
    """Every pare scheduler module's `to_device`: the kept host copy (on) or the plain copy (off)."""
    import pare.schedulers
    from pare.schedulers import scheduling_utils

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(pare.schedulers.__name__ + ".scheduling_") and \
                hasattr(module, "to_device") and module is not scheduling_utils:
            module.to_device = scheduling_utils.to_device if on else plain_to_device


def host_us(fn, n: int = 2000) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    from pare.bench import environment, workloads
    from pare.bench.timing import time_ms
    from pare.fast.prompt import encode_apart, encode_together
    from pare.models.autoencoder_kl import AutoencoderKL
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ref, device = import_reference(None), torch.device("cuda")
    header = {**environment(device, ref.__version__), "dtype": "float16", "command": " ".join(["python"] + sys.argv)}
    print(header, flush=True)
    w = workloads.build(ref, args.model, "pipeline", device, torch.float16, steps=args.steps)
    pipe = w.ours
    pipe.enable_fast()
    fast_vae = type(pipe.vae)

    # variant -> (the prompt and its negative in one call, the VAE's check read after its decoder is queued, the
    # schedule's host copy kept)
    variants = {"all": (True, True, True), "prompt apart": (False, True, True), "VAE check first": (True, False, True),
                "schedule read back": (True, True, False), "none": (False, False, False)}

    def variant(name: str) -> None:
        together, check_after, host_schedule = variants[name]
        encode_apart(pipe)
        if together:
            encode_together(pipe)
        pipe.vae.__class__ = fast_vae if check_after else AutoencoderKL
        keep_host_schedule(host_schedule)

    times = {name: [] for name in variants}
    with torch.no_grad():
        for name in times:  # warm-up: the batch-2 text encoder's capture
            variant(name)
            for _ in range(2):
                w.call_ours(pipe)
        for _ in range(args.rounds):
            for name in times:
                variant(name)
                times[name] += time_ms(lambda: w.call_ours(pipe), device, warmup=0, iters=args.iters)
    variant("all")
    base = statistics.median(times["none"])
    case = {name: {"ms": round(statistics.median(t), 3), "min_ms": round(min(t), 3),
                   "minus_none_ms": round(statistics.median(t) - base, 3)} for name, t in times.items()}
    print(w.name, json.dumps(case), flush=True)
    checks = {}
    for label, cache in (("unet loop", vars(pipe).get("_pare_loop")), ("vae decoder", pipe.vae.decoder._pare_graphed),
                         ("text encoder", pipe.text_encoder._pare_graphed)):
        if cache is None:
            continue
        checks[label] = {"modules": len(cache.inner), "parameters": len(cache.slots[1]),
                         "python loops us": round(host_us(lambda: loop_checks(cache)), 1),
                         "maps us": round(host_us(lambda: mapped_checks(cache)), 1)}
    print("GraphCache per-call checks:", json.dumps(checks), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ab_host.json").write_text(json.dumps({**header, "case": w.name, "image": case,
                                                                 "graph_cache_checks": checks}, indent=1))


if __name__ == "__main__":
    main()
