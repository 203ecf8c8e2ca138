"""Configs as data: every model and scheduler records the arguments it was built with.

diffusers twin: `configuration_utils.py` (`ConfigMixin`, `register_to_config`, `FrozenDict`).

A pare class declares its config the plain way, as keyword arguments of `__init__` with
diffusers' names and defaults. `@register_to_config` records the resolved values on
`.config`; `from_config` builds the class from a dict, a `config.json` or its folder, the
way a real checkpoint carries it:

- keys starting with `_` (`_class_name`, `_diffusers_version`, ...) are metadata: skipped;
- keys that diffusers' class accepts but pare has no code for are listed per class in
  `unsupported_config` with the one value pare supports (diffusers' default). A checkpoint
  that carries that value loads; any other value raises, naming the key;
- any other key is unknown to both libraries: diffusers ignores such keys with a warning,
  and so does pare.

Switching classes, `Other.from_config(scheduler.config)`, follows diffusers' two rules, since
they change which values the new class gets:

- a key the old object took from its `__init__` default (not given in its config) is dropped,
  so the new class takes its own default: SD1.5's PNDM config sets no timestep_spacing, so Euler
  built from it spaces "linspace" (Euler's default), not "leading" (PNDM's). diffusers records
  these keys in `_use_default_values`; pare in `config._defaulted`, and reads either;
- keys the new class does not use are kept aside (`config._hidden`) and handed on at the next
  switch, so PNDM -> Euler -> PNDM gets `skip_prk_steps` back.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("pare")


class Config(dict):
    """A read-only dict whose keys are also attributes (`unet.config.in_channels`).

    Beside the keys: `_defaulted`, the keys whose values came from `__init__`'s defaults, and
    `_hidden`, the keys of another class's config carried along for switching back.
    """

    def __init__(self, values=(), defaulted=(), hidden=None):
        super().__init__(values)
        object.__setattr__(self, "_defaulted", frozenset(defaulted))
        object.__setattr__(self, "_hidden", dict(hidden or {}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a config is read-only: build a new object with from_config(dict(config, key=value))")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly

    def __reduce__(self):  # pickle and copy.deepcopy rebuild from a plain dict, not item by item
        return (type(self), (dict(self), self._defaulted, self._hidden))


def register_to_config(init):
    """Decorate `__init__` so that the bound arguments (defaults filled in) land on `self.config`."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        # Store tuples as lists so that the config round-trips through JSON unchanged.
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        # Kept on the object too, so that a subclass replacing `_pare_config` in __init__ keeps them.
        object.__setattr__(self, "_pare_config_meta", (frozenset(set(values) - given), {}))
        object.__setattr__(self, "_pare_config", Config(values, *self._pare_config_meta))
        init(self, *args, **kwargs)

    return wrapper


def load_config_file(path: str | os.PathLike, config_name: str) -> dict:
    """Read a JSON config from a file, or from `config_name` inside a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / config_name
    if not path.is_file():
        raise FileNotFoundError(f"no config found: {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (key: value), not a {type(config).__name__}")
    return config


class ConfigMixin:
    """`from_config`, `.config` and `save_config` for classes whose `__init__` is `@register_to_config`."""

    config_name = "config.json"
    # diffusers keys pare has no code for -> the one value pare supports (diffusers' default).
    unsupported_config: dict[str, Any] = {}

    @property
    def config(self) -> Config:
        config = self._pare_config
        meta = getattr(self, "_pare_config_meta", None)
        if meta is not None and (config._defaulted, config._hidden) != meta:
            config = Config(config, *meta)
            object.__setattr__(self, "_pare_config", config)
        return config

    @classmethod
    def config_keys(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def resolve_config(cls, config: dict, source: str = "config") -> dict:
        """Split a checkpoint's config into the kwargs of `cls.__init__`, checking what pare cannot honour."""
        return cls._split_config(config, source)[0]

    @classmethod
    def _split_config(cls, config: dict, source: str = "config") -> tuple[dict, dict]:
        """(kwargs of `cls.__init__`, the keys it does not use): as `resolve_config`, after the switching rules."""
        defaulted = set(config.get("_use_default_values", ())) | set(getattr(config, "_defaulted", ()))
        config = {**getattr(config, "_hidden", {}), **{k: v for k, v in config.items() if k not in defaulted}}
        accepted = set(cls.config_keys())
        kwargs, ignored = {}, []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in accepted:
                kwargs[key] = value
            elif key in cls.unsupported_config:
                supported = cls.unsupported_config[key]
                if _normalise(value) != _normalise(supported):
                    raise ValueError(
                        f"{cls.__name__}: {source} sets {key}={value!r}, which pare does not implement "
                        f"(only {key}={supported!r}, diffusers' default, is supported)"
                    )
            else:
                ignored.append(key)
        if ignored:
            logger.warning("%s: %s keys %s are not used by this class and are ignored", cls.__name__, source, ignored)
        from .validation import check_config

        check_config(cls, kwargs, source)  # types and ranges, before anything is built
        return kwargs, {key: config[key] for key in ignored}

    @classmethod
    def from_config(cls, config: dict | str | os.PathLike, **overrides):
        """Build from a config dict, a config file or its folder; `overrides` replace config values.

        A config of another class (`Other.from_config(scheduler.config)`) follows diffusers' switching
        rules (module docstring): its defaulted keys are dropped, its unused keys carried along.
        """
        source = "config"
        if isinstance(config, (str, os.PathLike)):
            source = str(Path(config) / cls.config_name if Path(config).is_dir() else config)  # the file itself
            config = load_config_file(config, cls.config_name)
        merged = Config({**config, **overrides}, set(getattr(config, "_defaulted", ())) - set(overrides),
                        getattr(config, "_hidden", {}))
        kwargs, hidden = cls._split_config(merged, source)
        try:
            obj = cls(**kwargs)
        except (ValueError, TypeError) as e:  # a check inside the class: add the file it came from
            if source == "config":
                raise
            raise type(e)(f"{source}: {e}") from e
        defaulted, _ = obj._pare_config_meta
        object.__setattr__(obj, "_pare_config_meta", (defaulted, hidden))
        return obj

    def save_config(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.config_name
        # the reference class's name: a model on the fast path (pare/fast swaps in subclasses) saves as diffusers names it
        name = next(c.__name__ for c in type(self).__mro__ if not c.__module__.startswith("pare.fast"))
        path.write_text(json.dumps({"_class_name": name, **self.config}, indent=2, sort_keys=True))
        return path


def _normalise(value):
    """Compare configs the way JSON sees them: tuples and lists alike."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
