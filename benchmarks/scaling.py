"""Scaling of `pare sweep` and `pare generate --prompts` with torchrun: the same work at 1, 2, 4 ranks.

    python benchmarks/scaling.py --ranks 1,2,4                      # a 4-GPU host: the issue's measurement
    python benchmarks/scaling.py --ranks 1,2 --tag h200x2           # a 2-GPU host
    python benchmarks/scaling.py --device cpu --tiny --ranks 1,2 --results /tmp/scaling   # CPU smoke (gloo)

For each world size N, one `torchrun --standalone --nproc-per-node N` of

- the sweep `benchmarks/scaling-sweep.toml` (official SD1.5 and SDXL configs, random init;
  `--tiny`: the tiny configs), and
- a 256-prompt generation (`--prompts`, made here: prompt i is a fixed subject x setting, seed i) with
  a random-init official SD1.5 pipeline, 512², `--steps` steps, `--batch-size` images per call
  (`--tiny`: 16 prompts, the tiny pipeline, 32²),

each timed from launch to exit (so process start, imports, loading and the gather are counted).
speed-up = T(1 rank) / T(N); efficiency = speed-up / N (the issue's goal for generation: >= 0.9).
Every run is checked against the 1-rank one: the same report rows and the same image bytes.
Results, with the device, driver, versions and the commands: RESULTS/scaling-TAG.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ["an astronaut", "a red fox", "a lighthouse", "a bowl of ramen", "a vintage car", "a cat", "a dragon",
            "a sailboat", "a robot", "an old library", "a waterfall", "a city street", "a teapot", "a mountain cabin",
            "a hummingbird", "a castle"]
SETTINGS = ["at sunset", "in the rain", "in watercolour", "as a pencil sketch", "on the moon", "in a forest",
            "under neon lights", "in winter", "seen from above", "in the style of an oil painting", "at night",
            "in fog", "on a beach", "in a snow globe", "as a 3d render", "at dawn"]


def prompt_file(path: Path, n: int) -> Path:
    lines = [f"a photograph of {SUBJECTS[i % len(SUBJECTS)]} {SETTINGS[(i // len(SUBJECTS)) % len(SETTINGS)]}"
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_model(folder: Path, family: str, device: str) -> Path:
    import torch

    import diffusers
    from pare.parity.checkpoint import make_checkpoint

    dtype = torch.float16 if device == "cuda" else torch.float32
    folder = make_checkpoint(diffusers, folder, family, seed=0, device=device, dtype=dtype)
    if device == "cuda":
        torch.cuda.empty_cache()  # this process keeps only its CUDA context while the ranks run
    return folder


def timed(command: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}; its output: {log}\n{log.read_text()[-3000:]}")
    return seconds


def same_rows(a: Path, b: Path) -> bool:
    rows = lambda p: [{k: v for k, v in c.items() if k != "run"} for c in json.loads(p.read_text())["cases"]]  # noqa: E731
    return rows(a) == rows(b)


def same_images(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.png"))
    return names == sorted(p.name for p in b.glob("*.png")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def environment(device: str) -> dict:
    import torch

    import diffusers
    import pare

    env = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "pare": pare.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device == "cuda":
        env["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.split()[0]
        except (OSError, IndexError):
            pass
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                        f"OMP_NUM_THREADS=1 per rank)"
    return env


def markdown(result: dict) -> str:
    e = result["environment"]
    out = [f"# Scaling with torchrun: {e['device']}", "",
           " | ".join(f"{k} {v}" for k, v in e.items() if k != "device"), "",
           f"Sweep: `{result['sweep']['spec']}` ({result['sweep']['cases']} cases). Generation: "
           f"{result['generate']['prompts']} prompts, {result['generate']['flags']}.", "",
           "| work | ranks | wall (s) | speed-up | efficiency (speed-up / ranks) | same output as 1 rank |",
           "|---|---|---|---|---|---|"]
    for work in ("sweep", "generate"):
        for run in result[work]["runs"]:
            out.append(f"| {work} | {run['ranks']} | {run['seconds']:.1f} | {run['speedup']:.2f} | "
                       f"{run['efficiency']:.2f} | {'yes' if run['identical'] else 'NO'} |")
    out += ["", "Wall time is launch to exit of one `torchrun --standalone --nproc-per-node N` (process start, "
            "imports, loading, the gather and the report included).", "", "Commands:", ""]
    out += [f"    {c}" for c in result["commands"]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4", help="world sizes, the first the baseline (default 1,2,4)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny configs and 16 prompts: the CPU smoke test")
    parser.add_argument("--spec", default=None, help="the sweep spec (default benchmarks/scaling-sweep.toml)")
    parser.add_argument("--prompts", type=int, default=None, help="how many prompts (default 256; --tiny 16)")
    parser.add_argument("--steps", type=int, default=None, help="generation steps (default 30; --tiny 2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tag", default=None, help="results file name: scaling-TAG (default: device and ranks)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--keep", default=None, help="keep the reports and images in this folder")
    args = parser.parse_args()

    ranks = [int(r) for r in args.ranks.split(",")]
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(ranks):
            raise SystemExit(f"--ranks {args.ranks} needs {max(ranks)} GPUs; torch sees {torch.cuda.device_count()}")
    n_prompts = args.prompts or (16 if args.tiny else 256)
    steps = args.steps or (2 if args.tiny else 30)
    spec = Path(args.spec or ROOT / "benchmarks" / ("scaling-sweep-tiny.toml" if args.tiny else "scaling-sweep.toml"))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pare-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"

    model = make_model(work / "model", "tiny" if args.tiny else "sd15", args.device)
    prompts = prompt_file(work / "prompts.txt", n_prompts)
    size = ["--height", "32", "--width", "32"] if args.tiny else []
    gen_flags = ["--steps", str(steps), "--batch-size", str(args.batch_size), "--device", args.device,
                 "--seed", "0", *size]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    result = {"environment": environment(args.device), "commands": [],
              "sweep": {"spec": str(spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec), "runs": []},
              "generate": {"prompts": n_prompts, "flags": " ".join(gen_flags), "runs": []}}
    for n in ranks:
        sweep = launcher + [str(n), "-m", "pare.cli", "sweep", str(spec), "--device", args.device,
                            "--out", str(work / f"sweep-{n}")]
        generate = launcher + [str(n), "-m", "pare.cli", "generate", "--model", str(model), "--prompts",
                               str(prompts), "--out", str(work / f"images-{n}"), *gen_flags]
        for name, command in (("sweep", sweep), ("generate", generate)):
            seconds = timed(command, env, work / f"{name}-{n}.log")
            result["commands"].append("python " + " ".join(command[1:]).replace(str(work), "$WORK")
                                      .replace(f"{ROOT}{os.sep}", ""))
            base = result[name]["runs"][0] if result[name]["runs"] else None
            speedup = 1.0 if base is None else base["seconds"] / seconds
            baseline_n = ranks[0]
            identical = (same_rows(work / f"sweep-{baseline_n}.json", work / f"sweep-{n}.json") if name == "sweep"
                         else same_images(work / f"images-{baseline_n}", work / f"images-{n}"))
            result[name]["runs"].append({"ranks": n, "seconds": round(seconds, 2), "speedup": round(speedup, 3),
                                         "efficiency": round(speedup * baseline_n / n, 3), "identical": identical})
            print(f"{name} at {n} rank(s): {seconds:.1f} s, speed-up {speedup:.2f}, "
                  f"efficiency {speedup * baseline_n / n:.2f}, same output as {baseline_n} rank(s): {identical}",
                  flush=True)
    result["sweep"]["cases"] = len(json.loads((work / f"sweep-{ranks[0]}.json").read_text())["cases"])

    from pare.atomic import write_text_atomically

    tag = args.tag or ("cpu-smoke" if args.device == "cpu" else f"gpu-x{max(ranks)}")
    results = Path(args.results)
    for path, text in ((results / f"scaling-{tag}.json", json.dumps(result, indent=2)),
                       (results / f"scaling-{tag}.md", markdown(result))):
        write_text_atomically(path, text)
        print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
