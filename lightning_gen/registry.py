"""Name -> class registries for methods, datasets and callbacks.

A method, DataModule or callback registers itself with a decorator in its own file, next to the
dataclass that is its config schema. Nothing else needs editing when a file is added: the packages
import their submodules on first use (see ``load_all``), so the registry is complete whenever the
config layer asks it for a schema.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: type  # dataclass schema of the config group / callback section
    kind: str  # "method", "data" or "callback"

    @property
    def summary(self) -> str:
        """The first paragraph of the class docstring, on one line."""
        doc = (self.cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())


_REGISTRIES: dict[str, dict[str, Entry]] = {"method": {}, "data": {}, "callback": {}}
_LEGACY_METHODS: dict[str, tuple[str, Callable[[dict], dict]]] = {}


def _register(kind: str, name: str, config: type):
    def wrap(cls):
        existing = _REGISTRIES[kind].get(name)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise RuntimeError(f"two {kind}s registered under the name {name!r}: {existing.cls} and {cls}")
        _REGISTRIES[kind][name] = Entry(name, cls, config, kind)
        cls.registry_name = name
        return cls

    return wrap


def register_method(name: str, config: type):
    """Class decorator: make a LightningModule selectable as ``method=<name>``."""
    return _register("method", name, config)


def register_legacy_method(old_name: str, name: str, translate: Callable[[dict], dict]):
    """Checkpoints that name a method ``old_name`` (since merged into ``name``) load as ``name``, their
    stored config passed through ``translate`` (a dict of the old method's config -> one of the new)."""
    _LEGACY_METHODS[old_name] = (name, translate)


def checkpoint_method(name: str, cfg: dict) -> tuple[Entry, dict]:
    """The registry entry and config dict for a checkpoint's method name and stored config."""
    load_all()
    if name not in _REGISTRIES["method"] and name in _LEGACY_METHODS:
        new_name, translate = _LEGACY_METHODS[name]
        return get("method", new_name), translate(dict(cfg))
    return get("method", name), cfg


def register_datamodule(name: str, config: type):
    """Class decorator: make a LightningDataModule selectable as ``data=<name>``."""
    return _register("data", name, config)


def register_callback(name: str, config: type):
    """Class decorator: make a callback configurable under ``callbacks.<name>``."""
    return _register("callback", name, config)


_PACKAGES = ("lightning_gen.methods", "lightning_gen.data", "lightning_gen.callbacks")
_loaded = False


def load_all() -> None:
    """Import every module of the method, data and callback packages so that they register."""
    global _loaded
    if _loaded:
        return
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            importlib.import_module(info.name)
    _loaded = True


def entries(kind: str) -> dict[str, Entry]:
    load_all()
    return dict(sorted(_REGISTRIES[kind].items()))


def get(kind: str, name: str) -> Entry:
    from lightning_gen.config import ConfigError, did_you_mean

    table = entries(kind)
    if name not in table:
        raise ConfigError(
            f"unknown {kind} {name!r}{did_you_mean(name, table)}. Available: {', '.join(table)}. "
            f"Run `lgen list` to see them with a line each."
        )
    return table[name]


def build(kind: str, config: Any, name: str | None = None, **kwargs):
    """Instantiate the registered class for a validated config section (named by ``name`` or its ``name`` field)."""
    entry = get(kind, name or config.name)
    return entry.cls(config, **kwargs)
