"""`pare generate --prompts FILE`: every prompt of a file, batched, shared across torchrun's ranks, resumable.

    pare generate --model DIR --prompts prompts.jsonl --out images/ --batch-size 4
    torchrun --nproc-per-node 4 -m pare.cli generate --model DIR --prompts prompts.jsonl --out images/ --batch-size 4

1. Group the prompts into batches (`pare.prompts.batches`: same size and negative-prompt presence),
   from every prompt, so that the batches are the same at any world size and on a rerun.
2. Deal the batches out: batch j to rank j % world size.
3. Refuse to mix runs: an image already in OUT that the manifest says was made with other settings
   (prompt, seed, model, scheduler, steps, guidance, dtype, LoRAs, size) is an error.
4. Run each of this rank's batches that has an image missing: one pipeline call, a CPU generator per
   prompt seeded by its seed (its noise is drawn by itself, as diffusers draws a list of generators);
   write the missing images atomically, and a manifest line for each to OUT/manifest.rank{R}.jsonl.
5. Barrier; rank 0 merges the earlier manifest and the ranks' parts into OUT/manifest.jsonl.

A batch whose images all exist is skipped; one with some missing is run whole (only the missing are
written), so a resumed run writes the very pixels a fresh one would.
"""

from __future__ import annotations

import datetime
import inspect
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .atomic import write_atomically, write_text_atomically
from .prompts import Prompt, batches

MANIFEST = "manifest.jsonl"
CHECKED = ("prompt", "negative_prompt", "seed", "model", "scheduler", "sampler", "steps", "guidance", "dtype", "loras")


def read_manifest(out: Path) -> dict[str, dict]:
    """file name -> entry, from OUT/manifest.jsonl and any ranks' parts (a crashed run's too); later entries win.
    A part's last line may be cut short by a crash: lines that do not parse are skipped."""
    entries = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.rank*.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["file"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return entries


def merge_manifest(out: Path) -> Path:
    """Rank 0, after the barrier: one manifest.jsonl in prompt order, the parts removed."""
    entries = sorted(read_manifest(out).values(), key=lambda e: e.get("index", 0))
    path = write_text_atomically(out / MANIFEST, "".join(json.dumps(e) + "\n" for e in entries))
    for part in out.glob("manifest.rank*.jsonl"):
        part.unlink()
    return path


def check_earlier_run(prompts: list[Prompt], settings: dict, out: Path) -> None:
    """An image in `out` made with other settings than this run's (by its manifest entry) is an error."""
    earlier = read_manifest(out)
    for p in prompts:
        entry = earlier.get(p.file_name)
        if entry is None or not (out / p.file_name).exists():
            continue
        now = {**settings, "prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": p.seed}
        now.update({k: v for k, v in (("height", p.height), ("width", p.width)) if v is not None})
        changed = [k for k in (*CHECKED, "height", "width") if k in now and entry.get(k) != now[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"{out / p.file_name} was made with {k} {entry.get(k)!r}, this run asks for {now[k]!r} "
                             f"(manifest {out / MANIFEST}): write to another --out, or delete the old images")


def run_settings(args, pipe) -> dict:
    """What every image of this run shares, as the manifest records it."""
    guidance = args.guidance
    if guidance is None:  # the pipeline's own default (7.5; SDXL 5.0), as diffusers resolves it
        guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # a path, or a Hub id
    return {"model": model, "scheduler": type(pipe.scheduler).__name__, "sampler": args.sampler,
            "steps": args.steps, "guidance": guidance, "dtype": str(pipe.dtype).removeprefix("torch."),
            "loras": list(args.lora)}


def count_existing(prompts: list[Prompt], out: Path) -> int:
    return sum((out / p.file_name).exists() for p in prompts)


def generate_prompts(args, pipe, prompts: list[Prompt], world: distributed.World, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args, pipe)
    check_earlier_run(prompts, settings, out)
    mine = distributed.shard(batches(prompts, args.batch_size), world)
    pipe.set_progress_bar_config(disable=True)  # one bar per rank, over images, instead
    n_mine = sum(len(b) for b in mine)
    done_before = sum(count_existing(b, out) for b in mine)
    bar = tqdm(total=n_mine, initial=done_before, desc=f"rank {world.rank}", unit="img", position=world.rank,
               dynamic_ncols=True)
    total = None
    if world.is_main and world.distributed:
        total = tqdm(total=len(prompts), initial=count_existing(prompts, out), desc="all ranks", unit="img",
                     position=world.size, dynamic_ncols=True)
    part = out / f"manifest.rank{world.rank}.jsonl"
    made, started, last_count = 0, time.perf_counter(), 0.0
    for batch in mine:
        missing = [p for p in batch if not (out / p.file_name).exists()]
        if not missing:
            continue
        first = batch[0]
        kwargs = dict(prompt=[p.prompt for p in batch], num_inference_steps=args.steps, height=first.height,
                      width=first.width, generator=[torch.Generator("cpu").manual_seed(p.seed) for p in batch])
        if first.negative_prompt is not None:  # the batch key: all of the batch have one, or none
            kwargs["negative_prompt"] = [p.negative_prompt for p in batch]
        if args.guidance is not None:
            kwargs["guidance_scale"] = args.guidance
        tic = time.perf_counter()
        images = pipe(**kwargs).images
        seconds = time.perf_counter() - tic
        finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for p, image in zip(batch, images):
            if p not in missing:
                continue
            write_atomically(out / p.file_name, image.save)
            entry = {"index": p.index, "file": p.file_name, "prompt": p.prompt, "negative_prompt": p.negative_prompt,
                     "seed": p.seed, "height": image.height, "width": image.width, **settings,
                     "seconds": round(seconds / len(batch), 4), "batch_size": len(batch), "rank": world.rank,
                     "finished": finished}
            with part.open("a", encoding="utf-8") as f:  # a line per image: a crash loses at most the last one
                f.write(json.dumps(entry) + "\n")
            made += 1
        bar.update(len(missing))
        if total is not None and time.perf_counter() - last_count > 2:  # the other ranks' images, from the folder
            total.update(count_existing(prompts, out) - total.n)
            last_count = time.perf_counter()
    bar.close()
    print(f"{world}: made {made} images, skipped {n_mine - made} already in {out} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    distributed.barrier(world, "the end of the prompts")
    if not world.is_main:
        return 0
    if total is not None:
        total.update(count_existing(prompts, out) - total.n)
        total.close()
    manifest = merge_manifest(out)
    print(f"{count_existing(prompts, out)} of {len(prompts)} images in {out}; manifest {manifest}")
    return 0
