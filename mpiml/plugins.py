"""Resolve the user's own code named in config as 'package.module:Name'."""

from __future__ import annotations

import importlib
from typing import Any

from mpiml.errors import ConfigError


def import_object(spec: str, key: str) -> Any:
    """Resolve 'package.module:Name', telling a failing import apart from a missing name."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigError(f"{key} = {spec!r}: no module named '{module_name}' (HINT: is its "
                              "package installed, or its folder on PYTHONPATH?)") from err
        raise ConfigError(f"{key} = {spec!r}: module '{module_name}' exists but failed to import: "
                          f"{type(err).__name__}: {err}") from err
    except Exception as err:
        raise ConfigError(f"{key} = {spec!r}: module '{module_name}' exists but failed to import: "
                          f"{type(err).__name__}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key} = {spec!r}: module '{module_name}' has no '{attr}'") from None
