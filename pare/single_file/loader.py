"""Loading single-file checkpoints in Stability's original layout, strictly, into pare's models and pipelines.

diffusers twins: `loaders/single_file.py` (`FromSingleFileMixin.from_single_file`, pipelines) and
`loaders/single_file_model.py` (`FromOriginalModelMixin.from_single_file`, models).

    1. read       .safetensors; .ckpt/.pt only with allow_pickle=True, then torch.load(weights_only=True)
    2. recognise  the family from keys and shapes (families.py), unless config= says the architecture
    3. configure  each model's config: config= (a diffusers folder, Hub id or dict) or the family's own
    4. convert    every model's keys through its table (unet_map.py, vae_map.py, clip_map.py): each
                  model key must be in the file with the right shape, and every file key must be used
                  or listed in IGNORED_KEYS; one error names the file and every offending key
    5. build      the models on the meta device and assign the tensors: nothing is built half-loaded

As in diffusers, a pipeline takes its tokenizers, scheduler and
component configs from `config=` (a local diffusers folder, or a Hub repo id whose json/txt
files are fetched, never its weights); with no `config=` it reads them from the family's
default repo (`Family.default_repo`, diffusers' choice), which needs the Hub or its cache.
Models need no download: with no `config=` they are built from the family's official config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..loading import check_state_dict
from .clip_map import OPENAI_CLIP_MAP, OPENCLIP_MAP
from .errors import SingleFileError, listed
from .families import FAMILIES, UNET_PREFIX, VAE_PREFIX, VAE_PREFIXES, Family, detect_family, is_ignored
from .keymap import to_diffusers
from .unet_map import UNET_MAP
from .vae_map import VAE_MAP

logger = logging.getLogger("pare")

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CLIP_MAPS = {"openai": OPENAI_CLIP_MAP, "openclip": OPENCLIP_MAP}


# --- 1. read ---------------------------------------------------------------------------------


def read_checkpoint(path_or_state_dict, allow_pickle: bool = False) -> tuple[dict, str]:
    """(state dict, source name) of a single file, or of a state dict passed as is."""
    if isinstance(path_or_state_dict, dict):
        return _unwrap(path_or_state_dict, "the state dict passed in"), "the state dict passed in"
    path = Path(path_or_state_dict)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a cut or corrupt header
            raise SingleFileError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); "
                                  "is the file complete (a truncated download)?") from None
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SingleFileError(
                f"{path} is a pickle file ({suffix}), which can run code when it is opened; pare reads it only "
                "with allow_pickle=True (then with torch.load(weights_only=True)). Prefer a .safetensors copy.")
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SingleFileError(f"{path} cannot be read with torch.load(weights_only=True) "
                                  f"({type(e).__name__}: {e}); is it complete, and does it hold only tensors?") from None
    else:
        raise SingleFileError(f"{path}: unknown checkpoint suffix {suffix!r}; expected "
                              f"{SAFE_SUFFIXES + PICKLE_SUFFIXES}")
    return _unwrap(tensors, str(path)), str(path)


def _unwrap(checkpoint: dict, source: str) -> dict:
    # Lightning checkpoints nest the weights under "state_dict", beside global_step and the like.
    while "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        checkpoint = checkpoint["state_dict"]
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SingleFileError(f"{source} holds no tensors")
    return tensors


# --- 3. configure ----------------------------------------------------------------------------


def component_config(config, component: str, subfolder: str | None, family: Family | None, hub_kwargs) -> dict:
    """A model's config: a dict as is; a family name's (`"v2"`, `"xl_refiner"`, ...); a folder's (or Hub repo's)
    `<subfolder>/config.json`; with none, the recognised family's."""
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, str) and config in FAMILIES:
        family, config = FAMILIES[config], None
    if config is None:
        return dict(getattr(family, component))
    from ..configuration import load_config_file

    folder = Path(config)
    if folder.is_dir():
        sub = subfolder if subfolder is not None else (component if (folder / component).is_dir() else None)
        return load_config_file(folder / sub if sub else folder, "config.json")
    root = config_root(str(config), hub_kwargs)
    return load_config_file(root / (subfolder or component), "config.json")


def config_root(config: str, hub_kwargs: dict) -> Path:
    """A local folder, or the snapshot of a Hub repo's configs and tokenizer files (never its weights)."""
    if Path(config).is_dir():
        return Path(config)
    if config.count("/") != 1:
        raise FileNotFoundError(f"config={config!r} is neither a local folder nor a Hub repo id 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(config, allow_patterns=["*.json", "**/*.json", "*.txt", "**/*.txt",
                                                              "**/*.model"], **hub_kwargs))
    except Exception as e:
        raise FileNotFoundError(
            f"cannot fetch the configs of {config!r} ({type(e).__name__}: {e}). Offline, pass config= a local "
            "diffusers folder of the same family (its model_index.json, tokenizer and scheduler are read, "
            "never its weights).") from None


# --- 4. convert ------------------------------------------------------------------------------


def convert(state_dict: dict, prefix: str, keymap, model: torch.nn.Module, config: dict, source: str,
            read_from=None) -> tuple[dict, set]:
    """The model's state dict, read from the file through `keymap`; and the file keys it used.

    `read_from(original_key) -> key` redirects reads (the UNet's EMA copy). Raises one error
    listing every missing and every mis-shaped key.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # transformers' CLIP models differ across versions in a leading `text_model.`; the tables are written without it.
    bare = {k.removeprefix("text_model."): k for k in expected}
    names = keymap.names(bare, config)
    out, used, missing, misshaped = {}, set(), [], []
    for bare_key, name in names.items():
        key = bare[bare_key]
        original = prefix + name.original
        stored = read_from(original) if read_from else original
        if stored not in state_dict:
            missing.append(f"{stored} (for {key})")
            continue
        used.add(stored)
        tensor = to_diffusers(state_dict[stored], name.reshape)
        if tuple(tensor.shape) != expected[key]:
            misshaped.append(f"{stored}: file {tuple(state_dict[stored].shape)}, {type(model).__name__}.{key} "
                             f"needs {expected[key]}")
            continue
        out[key] = tensor
    if missing or misshaped:
        parts = [listed("keys the model needs are missing", missing) if missing else "",
                 listed("keys have the wrong shape", misshaped) if misshaped else ""]
        raise SingleFileError(f"{type(model).__name__} from {source} (keys under {prefix!r}): the file does not fit "
                              f"the model's config.\n" + "\n".join(p for p in parts if p))
    return out, used


def check_leftovers(state_dict: dict, used: set, prefixes: tuple[str, ...], source: str) -> None:
    """Every key under `prefixes` must have been used or be listed in IGNORED_KEYS."""
    left = [k for k in state_dict if k.startswith(prefixes) and k not in used and not is_ignored(k)]
    if left:
        raise SingleFileError(f"{source}: " + listed(f"keys under {list(prefixes)} fit no part of the model "
                                                     "(a different architecture or a bigger config?)", left))


def ema_reader(state_dict: dict, extract_ema: bool, source: str):
    """With extract_ema=True and EMA weights in the file, read `model.diffusion_model.a.b` from `model_ema.diffusion_modelab`."""
    if not extract_ema:
        return None
    if not any(k.startswith("model_ema.") and k != "model_ema.decay" and k != "model_ema.num_updates"
               for k in state_dict):
        logger.warning("%s has no EMA copy (model_ema.*): extract_ema=True reads its main weights, which in an "
                       "EMA-only file are the EMA weights", source)
        return None
    return lambda key: "model_ema." + key.removeprefix("model.").replace(".", "")


def build(model_factory, state_dict: dict, source: str, dtype, device=None):
    """Build on the meta device, check every tensor (non-finite ones too), assign, cast."""
    with torch.device("meta"):
        model = model_factory()
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    _rebuild_constant_buffers(model)
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


def _rebuild_constant_buffers(model):
    # transformers' CLIP keeps its position ids (0..N-1) in a non-persistent buffer that no file carries.
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise SingleFileError(f"{type(model).__name__}.{name} is set by no checkpoint (a bug in pare)")
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)


# --- 5. build: models ------------------------------------------------------------------------


def load_unet(state_dict, config: dict, source: str, extract_ema: bool = False):
    from ..models.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        shell = UNet2DConditionModel.from_config(config)
    weights, used = convert(state_dict, UNET_PREFIX, UNET_MAP, shell, shell.config, source,
                            ema_reader(state_dict, extract_ema, source))
    if any(k.startswith("model_ema.") for k in used):
        used |= {k for k in state_dict if k.startswith(UNET_PREFIX)}  # the main copy, replaced by the EMA one
    return weights, used, lambda: UNet2DConditionModel.from_config(config)


def vae_prefix(state_dict: dict) -> str:
    """`first_stage_model.` in a whole checkpoint, `vae.` in some merges, none in a standalone VAE file (as diffusers)."""
    return next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in state_dict)), "")


def load_vae(state_dict, config: dict, source: str):
    from ..models.autoencoder_kl import AutoencoderKL

    with torch.device("meta"):
        shell = AutoencoderKL.from_config(config)
    weights, used = convert(state_dict, vae_prefix(state_dict), VAE_MAP, shell, shell.config, source)
    return weights, used, lambda: AutoencoderKL.from_config(config)


def load_text_encoder(state_dict, slot, text_config, cls, source: str):
    with torch.device("meta"):
        shell = cls(text_config)
    prefix = slot.prefix
    weights, used = convert(state_dict, prefix, CLIP_MAPS[slot.format], shell, {}, source)
    if slot.format == "openclip" and not hasattr(shell, "text_projection"):
        # SD 2.x reads OpenCLIP's penultimate layer: diffusers' text encoder stops there (23 of ViT-H's 24
        # layers) and has no projection, so the file's last layer(s) and text_projection are not used.
        layers = text_config.num_hidden_layers
        used |= {k for k in state_dict if k == prefix + "text_projection"
                 or (k.startswith(prefix + "transformer.resblocks.")
                     and int(k[len(prefix + "transformer.resblocks."):].split(".")[0]) >= layers)}
    return weights, used, lambda: cls(text_config)


def model_from_single_file(cls, path_or_state_dict, config=None, subfolder: str | None = None,
                           torch_dtype: torch.dtype | None = None, allow_pickle: bool = False,
                           extract_ema: bool = False, device=None, **hub_kwargs):
    """`UNet2DConditionModel.from_single_file` / `AutoencoderKL.from_single_file` (diffusers' arguments)."""
    state_dict, source = read_checkpoint(path_or_state_dict, allow_pickle)
    component = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}[cls.__name__]
    family = None
    if config is None:
        # A standalone VAE file has no UNet to tell its family: diffusers then takes SD 1.x's config, and so does pare.
        standalone_vae = component == "vae" and not any(k.startswith(UNET_PREFIX) for k in state_dict)
        family = FAMILIES["v1"] if standalone_vae else detect_family(state_dict, source)
    model_config = component_config(config, component, subfolder, family, hub_kwargs)
    if component == "unet":
        weights, used, factory = load_unet(state_dict, model_config, source, extract_ema)
        check_leftovers(state_dict, used, (UNET_PREFIX,), source)
    else:
        prefix = vae_prefix(state_dict)
        if not any(k.startswith(prefix + "decoder.") for k in state_dict):
            raise SingleFileError(f"{source} holds no VAE: no key starts with "
                                  f"{[p + 'decoder.' for p in VAE_PREFIXES + ('',)]}")
        weights, used, factory = load_vae(state_dict, model_config, source)
        check_leftovers(state_dict, used, (prefix,) if prefix else ("",), source)
    return build(factory, weights, source, torch_dtype, device)


# --- 5. build: pipelines ---------------------------------------------------------------------


def pipeline_from_single_file(cls, path_or_state_dict, config=None, prediction_type: str | None = None,
                              torch_dtype: torch.dtype | None = None, allow_pickle: bool = False,
                              extract_ema: bool = False, **kwargs):
    """`<Pipeline>.from_single_file`: every model from the one file, the rest from `config=` (see the module docstring)."""
    import transformers

    from ..configuration import load_config_file
    from ..pipelines.pipeline_utils import _class_problem, read_model_index
    from ..schedulers import get_scheduler_class

    hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
    unknown = sorted(set(kwargs) - set(cls.component_kinds) - set(cls.options))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_single_file got unexpected arguments {unknown}; "
                        f"components: {list(cls.component_kinds)}, options: {list(cls.options)}")

    state_dict, source = read_checkpoint(path_or_state_dict, allow_pickle)
    family = detect_family(state_dict, source)
    wants_sdxl = "text_encoder_2" in cls.component_kinds
    if family.name == "xl_refiner":
        raise SingleFileError(f"{source} is an {family.description} checkpoint; pare has no refiner pipeline yet "
                              "(UNet2DConditionModel.from_single_file loads its UNet)")
    if family.sdxl != wants_sdxl:
        other = "StableDiffusionXLPipeline" if family.sdxl else "StableDiffusionPipeline"
        raise SingleFileError(f"{source} is an {family.description} checkpoint (family {family.name!r}), which "
                              f"{cls.__name__} cannot run; load it with {other}.from_single_file")

    if isinstance(config, str) and config in FAMILIES:  # a family name: its diffusers repo
        config = FAMILIES[config].default_repo
    root = config_root(str(config or family.default_repo), hub_kwargs)
    index = read_model_index(root)
    loaded, used, pending, problems = {}, set(), {}, []
    for name, kind in cls.component_kinds.items():
        if name in kwargs:
            continue
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            problems.append(f"{name}: missing from {root / 'model_index.json'} (entry: {entry!r})")
            continue
        problem = _class_problem(kind, entry[1])
        if problem:
            problems.append(f"{name}: {problem}")
        elif not (root / name).is_dir():
            problems.append(f"{name}: {root / name} does not exist")
        else:
            pending[name] = (kind, entry[1])
    if problems:
        raise ValueError(f"cannot build {cls.__name__} from {source} with the configs in {root}:\n  "
                         + "\n  ".join(problems))

    if "unet" in pending:  # the family and the config folder must agree before any key-by-key check
        _check_family_fits(state_dict, family, load_config_file(root / "unet", "config.json"), source, root / "unet")
    slots = {slot.component: slot for slot in family.text_encoders}
    for name, (kind, class_name) in pending.items():
        folder = root / name
        if kind == "unet":
            weights, keys, factory = load_unet(state_dict, load_config_file(folder, "config.json"), source,
                                               extract_ema)
            pending[name] = ("model", (factory, weights))
        elif kind == "vae":
            weights, keys, factory = load_vae(state_dict, load_config_file(folder, "config.json"), source)
            pending[name] = ("model", (factory, weights))
        elif kind in ("text_encoder", "text_encoder_2"):
            text_cls = getattr(transformers, class_name)
            text_config = text_cls.config_class.from_pretrained(folder)
            weights, keys, factory = load_text_encoder(state_dict, slots[name], text_config, text_cls, source)
            pending[name] = ("model", (factory, weights))
        elif kind == "tokenizer":
            keys, pending[name] = set(), ("ready", getattr(transformers, class_name).from_pretrained(folder))
        else:  # scheduler
            scheduler_config = load_config_file(folder, "scheduler_config.json")
            if prediction_type is not None:
                scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
            keys, pending[name] = set(), ("ready", get_scheduler_class(class_name).from_config(scheduler_config))
        used |= keys
    # Components passed in are not read from the file: their keys are left alone.
    passed = {"unet": UNET_PREFIX, "vae": vae_prefix(state_dict) or VAE_PREFIX,
              **{slot.component: slot.prefix for slot in family.text_encoders}}
    exempt = tuple(prefix for name, prefix in passed.items() if name in kwargs)
    used |= {k for k in state_dict if exempt and k.startswith(exempt)}
    check_leftovers(state_dict, used, ("",), source)
    for name, (what, value) in pending.items():
        loaded[name] = build(*value, source, torch_dtype) if what == "model" else value
    options = {k: index[k] for k in cls.options if k in index}
    return cls(**{**loaded, **options, **kwargs})


def _check_family_fits(state_dict, family: Family, unet_config: dict, source: str, folder) -> None:
    """One clear error when the file's family and the config folder's UNet disagree (before any key-by-key check)."""
    from .families import FamilyEvidence

    evidence = FamilyEvidence.of(state_dict)
    wanted = (unet_config.get("cross_attention_dim"), unet_config.get("in_channels", 4))
    found = (evidence.context_dim, evidence.in_channels)
    if evidence.context_dim is not None and wanted != found:
        raise SingleFileError(
            f"{source} is an {family.description} checkpoint (cross-attention width {found[0]}, {found[1]} input "
            f"channels), but the UNet config in {folder} has cross_attention_dim={wanted[0]}, in_channels="
            f"{wanted[1]}: config= must be a folder of the file's own family")
