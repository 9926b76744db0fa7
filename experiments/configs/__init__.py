"""ml_collections configs: ``default`` (offline digits) and its diffs, variants by argument
(``cifar.py:DATASET,MODEL``, ``mnist1d.py:NOISE``, ``digits_noisy.py:NOISE``).

A run is a config; the drivers describe each of theirs by the overrides it applies to a base
config, ``{"optimizer": "sam", "sam.rho": 0.1}`` (dotted fields, as ``--config.sam.rho=0.1``),
and find a finished run by comparing whole configs, as a resume does.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import ConfigError


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with each dotted field of ``overrides`` set (ConfigDict's type
    checks: an int field takes an int, a float field an int or a float).

    >>> from experiments.configs import default
    >>> override(default.get_config(), {"optimizer": "sam", "sam.rho": 0.1}).sam.rho
    0.1
    >>> override(default.get_config(), {"sam.rhoo": 0.1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    experiments.ConfigError: override 'sam.rhoo': config.sam has no field 'rhoo' (its fields: ...
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"override: overrides is a mapping of dotted config fields to values, e.g. "
            f"{{'optimizer': 'sam', 'sam.rho': 0.1}}, not {overrides!r}."
        )
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *path, field = key.split(".")
        section, where = config, "config"
        for name in path:
            if not isinstance(section.get(name), ml_collections.ConfigDict):
                raise ConfigError(_unknown(key, where, section, f"section {name!r}"))
            section, where = section[name], f"{where}.{name}"
        if field not in section:
            raise ConfigError(_unknown(key, where, section, f"field {field!r}"))
        try:
            section[field] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"override {key!r}={value!r}: {e}") from None
    return config


def _unknown(key: str, where: str, section: ml_collections.ConfigDict, what: str) -> str:
    return (
        f"override {key!r}: {where} has no {what} (its fields: {', '.join(sorted(section))}); "
        f"name a field as in --config.FIELD."
    )


def from_flags(path: str, flag_overrides: Sequence[str] = ()) -> Any:
    """The config of ``--config=PATH[:ARG]`` with its ``--config.FIELD=VALUE`` flags applied,
    parsed by ml_collections as the training program parses them.

    >>> from_flags("experiments/configs/mnist1d.py:0.4", ["--config.gam.rho=0.3"]).gam.rho
    0.3
    """
    argv = ["", f"--config={path}", *flag_overrides]
    flag_values = flags.FlagValues()
    try:
        with warnings.catch_warnings():  # ml_collections loads the file with load_module
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
            flag_values(argv)
            config = flag_values.config
            config.get("seed")  # the file is loaded when first read
        return config
    except Exception as error:  # a file that fails to load, an unknown field, a bad value
        reasons = []  # the messages along the chain of causes, tracebacks aside
        while error is not None:
            reason = error.args[0] if error.args else ""
            if isinstance(reason, str) and "Traceback" not in reason:
                reasons.append(" ".join(reason.split()))
            error = error.__cause__ or error.__context__
        reason = max(reasons, key=len, default="it failed to load").rstrip(".")
        raise ConfigError(
            f"--config={path} {' '.join(flag_overrides)}: {reason}; give a config file "
            f"(e.g. experiments/configs/default.py) and --config.FIELD=VALUE with its fields."
        ) from None


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """The driver's own options, and its ``--config.FIELD=VALUE`` flags (for
    ``configs.from_flags``); any other argument is refused."""
    args, rest = parser.parse_known_args(argv)
    config_flags = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, config_flags
