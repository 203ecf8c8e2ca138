"""Probe: a 3x3 convolution of SD1.5's shapes by something other than cuDNN. Three candidates, each against cuDNN:

1. **triton**: our own conv (Triton, implicit GEMM, NHWC). The question behind NOTES.md's "What is left":
   GroupNorm's apply pass (and its statistics) could live in the prologue (and epilogue) of the conv that reads
   (and writes) the map, but only in a conv we write, and that pays only if it is about as fast as cuDNN's. Output
   pixels p are the rows (M = N*H*W), output channels the columns; K = 9 C_in, walked tap by tap (dh, dw) and C_in
   in blocks: the A tile is the input rows p + dh*W + dw (zero where the tap leaves the image), the B tile the
   weight's (C_out, 3, 3, C_in) rows, which is a channels-last conv weight's memory order. Stride 1 only.
2. **gemm**: im2col (the nine shifted views of the padded NHWC map, concatenated on channels: (M, 9 C_in), in the
   weight's tap order) and one cuBLAS GEMM with the weight viewed as (C_out, 9 C_in). On small maps (SD1.5's 8 x 8
   and 16 x 16 at batch 2: M = 128 and 512 rows against K = 11520 to 23040) cuDNN's kernels stream the weight far
   below the memory's rate; cuBLAS's split-K GEMMs may not, and the copy costs little there (M 9 C_in values).
3. **triton-splitN** (maps of 16 x 16 and less): the Triton conv with K split N ways over more programs, each
   program's float32 partial sum written out and summed by a second launch, so that more programs stream the weight.

Each is timed two ways: `triton.testing.do_bench` (which flushes the L2 between runs: weights and activations
cold), and a CUDA graph of 24 convs over 8 copies of the weight (more than the L2 holds), replayed, per conv (the
UNet's case: cold weights, a warm map). The outputs are checked against cuDNN's.

    python benchmarks/conv_probe.py [--out FILE.json] [--batch 2] [--skip-triton]

Measured (H200, 2026-12-04; NOTES.md change 45): cuDNN is the fastest at every shape but the 8 x 8 1280 -> 1280
one (split 12 ways: 20.5 against 24.0 us); nothing here went into pare/.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
           for bm, bn, w, s in ((128, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                                (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (64, 256, 8, 3))]


@triton.autotune(configs=CONFIGS, key=["M", "H", "W", "C_in", "C_out"])
@triton.jit
def conv3x3(x_ptr, w_ptr, y_ptr, M, H, W, C_in, C_out,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(C_out, BN)
    group = pid // (GROUP_M * grid_n)  # programs of GROUP_M row tiles share their weight tiles in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rows = pid_m * BM + tl.arange(0, BM)  # output pixels
    cols = pid_n * BN + tl.arange(0, BN)  # output channels
    ow, oh = rows % W, (rows // W) % H
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    per_tap = C_in // BK
    for t in tl.range(0, 9 * per_tap):
        tap, c0 = t // per_tap, (t % per_tap) * BK
        dh, dw = tap // 3 - 1, tap % 3 - 1
        ih, iw = oh + dh, ow + dw
        ok = (rows < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        src = rows + dh * W + dw  # the same image's pixel (ih, iw)
        a = tl.load(x_ptr + src[:, None].to(tl.int64) * C_in + (c0 + ks)[None, :], mask=ok[:, None], other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * (9 * C_in) + tap * C_in + (c0 + ks)[:, None],
                    mask=(cols < C_out)[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    y = y_ptr + rows[:, None].to(tl.int64) * C_out + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < C_out)[None, :])


SPLIT_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in ((128, 64, 4, 4), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3),
                                      (64, 128, 4, 4), (128, 32, 4, 5))]


@triton.autotune(configs=SPLIT_CONFIGS, key=["M", "H", "W", "C_in", "C_out", "splits"])
@triton.jit
def conv3x3_split(x_ptr, w_ptr, ws_ptr, M, H, W, C_in, C_out, splits,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """`conv3x3` with K split `splits` ways (program axis 1): each program's float32 partial sum to ws[split]."""
    grid_n = tl.cdiv(C_out, BN)
    pid_m, pid_n, split = tl.program_id(0) // grid_n, tl.program_id(0) % grid_n, tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ow, oh = rows % W, (rows // W) % H
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    per_tap = C_in // BK
    chunk = tl.cdiv(9 * per_tap, splits)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, 9 * per_tap)
    for t in tl.range(lo, hi):
        tap, c0 = t // per_tap, (t % per_tap) * BK
        dh, dw = tap // 3 - 1, tap % 3 - 1
        ih, iw = oh + dh, ow + dw
        ok = (rows < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        src = rows + dh * W + dw
        a = tl.load(x_ptr + src[:, None].to(tl.int64) * C_in + (c0 + ks)[None, :], mask=ok[:, None], other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * (9 * C_in) + tap * C_in + (c0 + ks)[:, None],
                    mask=(cols < C_out)[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    ws = ws_ptr + split.to(tl.int64) * M * C_out + rows[:, None].to(tl.int64) * C_out + cols[None, :]
    tl.store(ws, acc, mask=(rows < M)[:, None] & (cols < C_out)[None, :])


@triton.jit
def split_sum(ws_ptr, y_ptr, N, splits, BLOCK: tl.constexpr):
    """y = sum over the splits of ws (splits, N) in float32, rounded once to y's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(ws_ptr + s * N + i, mask=i < N, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=i < N)


def conv_split(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """`conv` with K split `splits` ways, then summed (two launches)."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    m = n * h * w
    ws = torch.empty(splits, m, c_out, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(c_out, meta["BN"]), splits)  # noqa: E731
    conv3x3_split[grid](x, weight, ws, m, h, w, c_in, c_out, splits)
    y = torch.empty(n, c_out, h, w, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    split_sum[(triton.cdiv(m * c_out, 1024),)](ws, y, m * c_out, splits, BLOCK=1024)
    return y


def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, C_in, H, W) channels last, (C_out, C_in, 3, 3) channels last -> (N, C_out, H, W) channels last."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    assert x.is_contiguous(memory_format=torch.channels_last) and weight.is_contiguous(memory_format=torch.channels_last)
    assert c_in % 64 == 0
    y = torch.empty(n, c_out, h, w, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    m = n * h * w
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(c_out, meta["BN"]),)  # noqa: E731
    conv3x3[grid](x, weight, y, m, h, w, c_in, c_out)
    return y


def im2col_conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The 3x3 conv (padding 1) as im2col and one GEMM: (N, C_in, H, W) channels last -> (N, C_out, H', W')."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H + 2, W + 2, C_in)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    cols = torch.cat([xp[:, dh:dh + stride * (ho - 1) + 1:stride, dw:dw + stride * (wo - 1) + 1:stride]
                      for dh in range(3) for dw in range(3)], dim=-1)  # (N, H', W', 9 C_in), the taps in weight order
    y = cols.view(n * ho * wo, 9 * c_in) @ weight.permute(0, 2, 3, 1).reshape(c_out, 9 * c_in).t()  # (M, C_out)
    return y.view(n, ho, wo, c_out).permute(0, 3, 1, 2)  # channels last


def graphed_us(fn, x, weights, reps: int = 24) -> float:
    """Microseconds per conv: `reps` convs over the weight copies in turn, captured in one CUDA graph, replayed."""
    for w in weights:  # warm-up (cuBLAS's and cuDNN's plans) on a side stream, as capture wants
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(x, weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(15):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


# SD1.5's 3x3 convs at batch 2, 64^2 latents: (side in, C_in, C_out, stride, how many in a UNet step); the
# prefix's (conv_in, the first ResNet) at batch 1 and the sub-pixel upsamplers left out
SHAPES = [(64, 320, 320, 1, 7), (64, 640, 320, 1, 2), (64, 960, 320, 1, 1), (64, 320, 320, 2, 1),
          (32, 320, 640, 1, 1), (32, 640, 640, 1, 6), (32, 1280, 640, 1, 1), (32, 960, 640, 1, 1), (32, 1920, 640, 1, 1),
          (32, 640, 640, 2, 1),
          (16, 640, 1280, 1, 1), (16, 1280, 1280, 1, 6), (16, 2560, 1280, 1, 2), (16, 1920, 1280, 1, 1),
          (16, 1280, 1280, 2, 1),
          (8, 1280, 1280, 1, 11), (8, 2560, 1280, 1, 3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--skip-triton", action="store_true", help="time cuDNN and im2col + GEMM only")
    args = parser.parse_args()
    import diffusers

    from pare.bench import environment

    torch.manual_seed(0)
    cudnn = lambda x, w, stride=1: F.conv2d(x, w, stride=stride, padding=1)  # noqa: E731
    ways = {"cudnn": cudnn, "gemm": im2col_conv}
    rows, total = [], {}
    for side, c_in, c_out, stride, count in SHAPES:
        x = torch.randn(args.batch, c_in, side, side, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        weights = [(torch.randn(c_out, c_in, 3, 3, device="cuda", dtype=torch.float16) / (3 * c_in**0.5)).contiguous(
            memory_format=torch.channels_last) for _ in range(8)]
        w = weights[0]
        ref = cudnn(x, w, stride)
        out = side // stride
        flops = 2 * args.batch * out * out * c_in * c_out * 9
        row = {"side": side, "c_in": c_in, "c_out": c_out, "stride": stride, "count": count, "gflop": flops / 1e9,
               "weight_mb": w.numel() * 2 / 1e6}
        here = {k: f for k, f in ways.items()}
        if stride == 1 and not args.skip_triton:
            here["triton"] = lambda x, w, stride=1: conv(x, w)
            if side <= 16:  # the small maps, where cuDNN streams the weights slowly: K split 4, 8 or 12 ways
                for k in (4, 8, 12):
                    here[f"triton-split{k}"] = lambda x, w, stride=1, k=k: conv_split(x, w, k)
        line = f"{side:3d}^2/{stride} {c_in:5d}->{c_out:5d} x{count:2d}:"
        for name, fn in here.items():
            got = fn(x, w, stride)
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
            cold = triton.testing.do_bench(lambda: fn(x, w, stride), warmup=25, rep=100) * 1e3
            warm = graphed_us(lambda x_, w_: fn(x_, w_, stride), x, weights)
            row[name] = {"cold_us": cold, "graph_us": warm, "graph_tflops": flops / warm / 1e6, "max_rel_err": err}
            if name == "triton":
                row[name]["config"] = str(conv3x3.best_config)
            total[name] = total.get(name, 0.0) + count * warm
            line += f"  {name} {cold:6.1f} cold, {warm:6.1f} graph us ({flops / warm / 1e6:4.0f} TF/s, err {err:.0e})"
        rows.append(row)
        print(line, flush=True)
    print("a step's 3x3 convs as listed, summed over their counts (graph us): "
          + ", ".join(f"{k} {v:.0f}" for k, v in total.items()))
    best = sum(r["count"] * min(v["graph_us"] for v in r.values() if isinstance(v, dict)) for r in rows)
    print(f"with the fastest way per shape: {best:.0f} us")
    if args.out:
        header = {**environment(torch.device("cuda"), diffusers.__version__), "command": " ".join(["python"] + sys.argv)}
        with open(args.out, "w") as f:
            json.dump({"header": header, "batch": args.batch, "rows": rows, "total_graph_us": total}, f, indent=1)


if __name__ == "__main__":
    main()
