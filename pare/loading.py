"""Finding and reading official diffusers-format weights, strictly.

diffusers twin: `models/model_loading_utils.py` and `utils/hub_utils.py`.

A model folder holds `config.json` and its weights under one of these names (diffusers'
conventions; `.fp16` stands for any `variant`):

    diffusion_pytorch_model.safetensors                  one file
    diffusion_pytorch_model.fp16.safetensors             a variant
    diffusion_pytorch_model.safetensors.index.json       shards, listed by a weight_map
    diffusion_pytorch_model.safetensors.index.fp16.json  sharded variant
    diffusion_pytorch_model.bin                          legacy pickle: only with allow_bin=True

Loading is all or nothing: a missing, unexpected, mis-shaped or non-finite weight raises
`WeightLoadError` naming every offending key and the file it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHTS_NAME = "diffusion_pytorch_model"


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def add_variant(filename: str, variant: str | None) -> str:
    """`diffusion_pytorch_model.safetensors` + `fp16` -> `diffusion_pytorch_model.fp16.safetensors`."""
    if variant is None:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | None = None,
) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched (or found in the cache) by huggingface_hub."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{path} has no subfolder {subfolder!r}")
        return folder
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a Hub repo id of the form 'org/name'")

    from huggingface_hub import snapshot_download

    # Fetch only the part of the repo this component needs, not every weight file in it.
    patterns = [f"{subfolder}/*", "model_index.json"] if subfolder else None
    snapshot = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=bool(local_files_only),
        token=token,
        allow_patterns=patterns,
    )
    return resolve_folder(snapshot, subfolder)


def find_weight_files(folder: Path, variant: str | None = None, allow_bin: bool = False) -> list[Path]:
    """The weight files of one model folder, in the order of preference diffusers uses."""
    single = folder / add_variant(f"{WEIGHTS_NAME}.safetensors", variant)
    index = folder / add_variant(f"{WEIGHTS_NAME}.safetensors.index.json", variant)
    candidates = [single, index]
    if allow_bin:
        candidates += [
            folder / add_variant(f"{WEIGHTS_NAME}.bin", variant),
            folder / add_variant(f"{WEIGHTS_NAME}.bin.index.json", variant),
        ]
    for candidate in candidates:
        if candidate.is_file():
            return _read_index(candidate) if candidate.name.endswith(".json") else [candidate]

    present = sorted(p.name for p in folder.iterdir())
    hint = ""
    if not allow_bin and any(name.endswith(".bin") for name in present):
        hint = " Only legacy .bin weights are present: pass allow_bin=True to load them (they are read with weights_only=True)."
    elif variant is not None:
        hint = f" No weights of variant {variant!r}: pass variant=None for the default weights, or another variant."
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {[c.name for c in candidates]}; the folder holds {present}.{hint}"
    )


def _read_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{index} is not a valid shard index: not JSON ({e})") from e
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightLoadError(f"{index} has no weight_map")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are not in {index.parent}: {missing}")
    return [index.parent / s for s in shards]


def read_state_dict(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Read every tensor of every file; return the state dict and the file each key came from."""
    state_dict, origin = {}, {}
    for file in files:
        tensors = read_weight_file(file)
        for key, tensor in tensors.items():
            if key in state_dict:
                raise WeightLoadError(f"weight {key!r} appears in both {origin[key]} and {file}")
            state_dict[key], origin[key] = tensor, file
    return state_dict, origin


def read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """One safetensors file or legacy pickle -> its tensors; a file that cannot be read raises
    `WeightLoadError` naming it and saying what is wrong (the reader's own exception is its `__cause__`)."""
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except Exception as e:  # safetensors raises SafetensorError, or OSError for some short files
            if isinstance(e, FileNotFoundError):
                raise
            raise WeightLoadError(f"cannot read {file}: {diagnose_safetensors(file)} (safetensors: {e})") from e
    try:
        # Legacy pickles can run code when unpickled; weights_only=True refuses anything but tensors.
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (a broken zip archive), ...
        what = ("it holds objects other than tensors, which weights_only=True refuses to unpickle"
                if "weights only" in str(e).lower() else "it is truncated, or not a PyTorch checkpoint")
        raise WeightLoadError(f"cannot read {file}: {what} (torch.load: {type(e).__name__}: {e})") from e
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        raise WeightLoadError(f"{file} does not hold a state dict (a dict of tensors) but a {type(tensors).__name__}")
    return tensors


def diagnose_safetensors(file: Path) -> str:
    """What is wrong with a safetensors file, in words: its layout is an 8-byte little-endian header
    length N, N bytes of JSON (name -> dtype, shape, data_offsets), then the tensor bytes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is truncated: {size} bytes, shorter than the 8-byte header length"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return (f"it is truncated or not a safetensors file: its first 8 bytes announce a {n}-byte header, "
                    f"but only {size - 8} bytes follow")
        header = f.read(n)
    try:
        entries = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its header is garbled: not valid JSON"
    if not isinstance(entries, dict):
        return "its header is garbled: not a JSON object"
    ends = [e.get("data_offsets", [0, 0])[-1] for k, e in entries.items() if k != "__metadata__" and isinstance(e, dict)]
    data = size - 8 - n
    if ends and max(ends) > data:
        return f"it is truncated: its tensors need {max(ends)} bytes of data, but only {data} bytes follow the header"
    return "its header does not describe its tensors (a bad dtype, shape or offset)"


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every key that would make `load_state_dict(strict=True)` fail, or carry NaN/inf."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    wrong_dtype = sorted(f"{k}: checkpoint {state_dict[k].dtype}, model a floating-point tensor"
                         for k in floating & set(state_dict) if not state_dict[k].is_floating_point())
    nonfinite = sorted(
        k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    problems = [
        (f"{len(missing)} missing", missing),
        (f"{len(unexpected)} unexpected", unexpected),
        (f"{len(misshaped)} mis-shaped", misshaped),
        (f"{len(wrong_dtype)} wrong-dtype", wrong_dtype),
        (f"{len(nonfinite)} non-finite (NaN or inf)", nonfinite),
    ]
    problems = [(title, keys) for title, keys in problems if keys]
    if not problems:
        return
    lines = [f"{type(model).__name__}: the weights in {source} do not fit the model built from its config."]
    for title, keys in problems:
        shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
        lines.append(f"{title} keys:\n  " + "\n  ".join(shown))
    raise WeightLoadError("\n".join(lines))
