"""Prompt files for `pare generate --prompts`: what each image is, its file name, and which images share a batch.

Two formats:

- plain text (any extension but .jsonl / .ndjson): one prompt per line; blank lines are skipped;
- JSON lines (.jsonl, .ndjson): one object per line, `{"prompt": "...", "seed": 7, "height": 512,
  "width": 768, "negative_prompt": "blurry"}`; only `prompt` is required.

Prompt i (counting prompts, not lines, from 0) without a seed gets `base_seed + i`; without a size or
negative prompt, the command's (`--height`, `--width`, `--negative-prompt`; the model's size by
default). Its image is `{i:06d}-seed{seed}.png`: the same file gives the same names, and the same
images, whatever the number of ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

JSON_SUFFIXES = (".jsonl", ".ndjson")
KEYS = ("prompt", "seed", "height", "width", "negative_prompt")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; JSON and most tools stop at int64


@dataclass(frozen=True)
class Prompt:
    index: int
    prompt: str
    seed: int
    height: int | None = None  # None: the model's default size
    width: int | None = None
    negative_prompt: str | None = None

    @property
    def file_name(self) -> str:
        return f"{self.index:06d}-seed{self.seed}.png"

    @property
    def batch_key(self) -> tuple:
        """Prompts with equal keys can share one pipeline call: one latent size, and a negative prompt for all or
        none (SDXL's unconditional half is zeros without one, the embedding of "" with one)."""
        return (self.height, self.width, self.negative_prompt is not None)


def _check(value, key: str, where: str):
    if key in ("prompt", "negative_prompt"):
        if not isinstance(value, str) or (key == "prompt" and not value.strip()):
            raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
    if key == "seed" and not 0 <= value <= MAX_SEED:
        raise ValueError(f"{where}: seed must be in [0, 2**63 - 1], got {value}")
    if key in ("height", "width") and (value <= 0 or value % 8):
        raise ValueError(f"{where}: {key} must be a positive multiple of 8, got {value}")
    return value


def _json_line(line: str, where: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg}); each line of a .jsonl file is one, "
                         f'e.g. {{"prompt": "a cat", "seed": 0}}') from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\", got {type(item).__name__}")
    unknown = sorted(set(item) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a prompt line has {', '.join(KEYS)}")
    if "prompt" not in item:
        raise ValueError(f"{where}: no \"prompt\" key")
    return {k: _check(v, k, where) for k, v in item.items() if v is not None}


def read_prompts(path: str | Path, base_seed: int = 0, height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None) -> list[Prompt]:
    """Every prompt of the file, in order, with the defaults filled in. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.suffix.lower() in JSON_SUFFIXES
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if jsonl:
            item = _json_line(line, where)
        else:
            if not prompts and line.lstrip().startswith('{"prompt"'):
                raise ValueError(f"{where} looks like JSON lines, but {path.name} is read as plain text (one "
                                 f"prompt per line): name it {path.stem}.jsonl")
            item = {"prompt": line.strip()}
        i = len(prompts)
        prompts.append(Prompt(i, item["prompt"], item.get("seed", base_seed + i), item.get("height", height),
                              item.get("width", width), item.get("negative_prompt", negative_prompt)))
    if not prompts:
        raise ValueError(f"--prompts {path} has no prompts")
    return prompts


def batches(prompts: list[Prompt], batch_size: int) -> list[list[Prompt]]:
    """The pipeline calls: prompts that share a batch key, in prompt order, `batch_size` at a time.

    Made from every prompt, whatever is already done and however many ranks there are, so each image
    comes from the same batch on every run (a batch's composition moves its images by float rounding).
    A batch closes when it is full; the rest close at the end, in the order of their first prompt."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    done, open_ = [], {}
    for p in prompts:
        batch = open_.setdefault(p.batch_key, [])
        batch.append(p)
        if len(batch) == batch_size:
            done.append(open_.pop(p.batch_key))
    return sorted(done + list(open_.values()), key=lambda b: b[0].index)
