"""A sweep's spec (a TOML file, a YAML file, or flags) and its cases: the product of the axes, in spec order.

    # sweep.toml: 2 configs x 2 dtypes x 2 seeds x (unet + vae + 2 schedulers x (scheduler + pipeline)) = 48 cases
    configs = ["sd15", "sdxl"]              # pare parity --config names (or model = "DIR_OR_HUB_ID" instead)
    dtypes = ["fp16", "bf16"]
    seeds = [0, 1]
    schedulers = ["DDIMScheduler", "EulerDiscreteScheduler"]   # or "all"; left out: the folder's own
    components = ["unet", "vae", "scheduler", "pipeline"]
    steps = 50
    reference_path = "~/src/diffusers"
    fast = false                            # true: pare's side on its fast path (pare parity --fast)

One case is one `pare parity` run of one component: (config, dtype, seed, component, scheduler).
The scheduler axis applies to the components that run a scheduler (`scheduler`, `pipeline`); a UNet,
VAE or ControlNet case does not depend on it and is run once, not once per scheduler. Cases are
listed configs, then dtypes, seeds, components and schedulers, the last varying fastest: that order
is the report's, whatever the number of ranks.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..parity.checkpoint import FAMILIES
from ..parity.run import COMPONENTS, EXTRA_COMPONENTS
from ..parity.tolerances import DTYPES

AXES = ("configs", "dtypes", "seeds", "schedulers", "components")
SETTINGS = ("model", "reference_path", "steps", "depth", "device", "fast")
SCHEDULED = ("scheduler", "pipeline")  # the components the scheduler axis applies to
DEVICES = ("cpu", "cuda")


@dataclass
class Spec:
    configs: list[str] = field(default_factory=lambda: ["tiny"])
    dtypes: list[str | None] = field(default_factory=lambda: [None])  # None: pare parity's default
    seeds: list[int] = field(default_factory=lambda: [0])
    schedulers: list[str | None] = field(default_factory=lambda: [None])  # None: the folder's own scheduler
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))
    model: str | None = None
    reference_path: str | None = None
    steps: int = 50
    depth: str = "blocks"
    device: str | None = None  # None: cuda when available, else cpu
    fast: bool = False  # pare's side on its fast path (pare parity --fast)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    index: int  # position in spec order
    config: str | None  # a parity --config name; None with a --model
    dtype: str
    seed: int
    component: str
    scheduler: str | None  # None: not a scheduled component, or the folder's own scheduler

    @property
    def label(self) -> str:
        parts = [self.config or "model", self.dtype, f"seed {self.seed}", self.component]
        if self.component in SCHEDULED:
            parts.append(self.scheduler or "its own scheduler")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def _listed(key: str, value, where: str) -> list:
    """An axis value: a list, or one comma-separated string ("fp16,bf16"), or one number."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"{where}: {key} must be a list (or one comma-separated string), got {value!r}")


def _check_choices(key: str, values: list, allowed, where: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{where}: {key} {unknown} not known; choose from {sorted(allowed)}")


def read_spec_file(path: str | Path) -> dict:
    """The raw keys of a TOML (`.toml`) or YAML (`.yaml`, `.yml`: needs PyYAML, which pare does not require) spec."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading a YAML spec needs PyYAML (pip install pyyaml); or write it as "
                             f"TOML, which Python reads itself") from None
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    elif path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser, as the package tomli
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError(f"{path}: reading TOML needs Python 3.11 or later, or pip install tomli") from None
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    else:
        raise ValueError(f"sweep spec {path}: expected a .toml file (or .yaml / .yml with PyYAML installed)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a spec is a table of keys ({', '.join(AXES + SETTINGS)}), got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_spec(raw: dict, where: str = "sweep spec") -> Spec:
    """A checked Spec from raw keys (a file's, with flags laid over them); `where` names their source in errors."""
    from ..schedulers import SCHEDULERS

    unknown = sorted(set(raw) - set(AXES + SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a spec has {', '.join(AXES + SETTINGS)}")
    spec = Spec()
    if raw.get("model") is not None:
        if raw.get("configs") is not None:
            raise ValueError(f"{where}: give configs (random-init checkpoints made for the run) or model "
                             f"(one pipeline folder or Hub id), not both")
        spec.model, spec.configs = str(raw["model"]), [None]
        if Path(spec.model).is_file():  # one checkpoint file: pare parity compares its loading only
            spec.components = ["unet", "vae"]
    elif raw.get("configs") is not None:
        spec.configs = _listed("configs", raw["configs"], where)
        _check_choices("configs", spec.configs, FAMILIES, where)
    if raw.get("dtypes") is not None:
        spec.dtypes = _listed("dtypes", raw["dtypes"], where)
        _check_choices("dtypes", spec.dtypes, DTYPES, where)
    if raw.get("seeds") is not None:
        seeds = _listed("seeds", raw["seeds"], where)
        try:
            spec.seeds = [int(s) for s in seeds if not isinstance(s, (bool, float))]
        except ValueError:
            spec.seeds = []
        if len(spec.seeds) != len(seeds):
            raise ValueError(f"{where}: seeds must be integers, got {seeds!r}")
    if raw.get("schedulers") is not None:
        names = _listed("schedulers", raw["schedulers"], where)
        spec.schedulers = sorted(SCHEDULERS) if names == ["all"] else names
        _check_choices("schedulers", spec.schedulers, SCHEDULERS, where)
    if raw.get("components") is not None:
        spec.components = _listed("components", raw["components"], where)
        _check_choices("components", spec.components, COMPONENTS + EXTRA_COMPONENTS, where)
    for key in AXES:
        values = getattr(spec, key)
        if not values:
            raise ValueError(f"{where}: {key} is empty: an axis needs at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"{where}: {key} lists a value twice: {values}")
    if "controlnet" in spec.components:
        from ..parity.controlnet_checkpoint import FAMILY_CONTROLNETS

        missing = [c for c in spec.configs if c not in FAMILY_CONTROLNETS]
        if missing:
            raise ValueError(f"{where}: the controlnet component needs a config with a published ControlNet "
                             f"({sorted(FAMILY_CONTROLNETS)}); not {missing}")
    if raw.get("reference_path") is not None:
        spec.reference_path = str(Path(str(raw["reference_path"])).expanduser())
    if raw.get("steps") is not None:
        if isinstance(raw["steps"], bool) or not isinstance(raw["steps"], int) or raw["steps"] < 1:
            raise ValueError(f"{where}: steps must be a positive integer, got {raw['steps']!r}")
        spec.steps = raw["steps"]
    if raw.get("depth") is not None:
        from ..parity.blocks import DEPTHS

        _check_choices("depth", [raw["depth"]], DEPTHS, where)
        spec.depth = raw["depth"]
    if raw.get("device") is not None:
        _check_choices("device", [raw["device"]], DEVICES, where)
        spec.device = raw["device"]
    if raw.get("fast") is not None:
        if not isinstance(raw["fast"], bool):
            raise ValueError(f"{where}: fast must be true or false, got {raw['fast']!r}")
        spec.fast = raw["fast"]
    return spec


def default_dtype(spec: Spec, device: str) -> str:
    """pare parity's default precision for this spec: fp64 for a --reference-path check on the CPU, else fp32."""
    return "fp64" if spec.reference_path is not None and device == "cpu" else "fp32"


def expand(spec: Spec, device: str) -> list[Case]:
    """Every case of the spec, in spec order (configs, dtypes, seeds, components, then schedulers)."""
    cases = []
    for config, dtype, seed, component in itertools.product(spec.configs, spec.dtypes, spec.seeds, spec.components):
        for scheduler in (spec.schedulers if component in SCHEDULED else [None]):
            cases.append(Case(len(cases), config, dtype or default_dtype(spec, device), seed, component, scheduler))
    return cases
