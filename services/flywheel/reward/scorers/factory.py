"""Selecting the scorer to serve from settings: built-ins, plugins and ensembles of both.

`FLYWHEEL_REWARD_SCORER` names one of:

- a built-in: `transformer`, `vader`, `remote`;
- `ensemble`: members and weights from `FLYWHEEL_REWARD_ENSEMBLE` (each member any of these names);
- a plugin: the name of an entry point in the group `flywheel.scorers` (what a pip-installed
  package registers), or `package.module:Class` for code that is merely importable.

A plugin is a `Scorer` subclass or a callable returning a `Scorer`. If it has a `settings_class`
attribute (a pydantic-settings `BaseSettings` subclass), it is called with an instance read from
`FLYWHEEL_REWARD_PLUGIN_<FIELD>` environment variables and, when `reward_plugin_config_file` is set,
from that JSON or TOML file (file values win over the environment, as pydantic's explicit values do).
"""

from __future__ import annotations

import importlib
import json
import tomllib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flywheel.reward.scorers.base import Scorer
from flywheel.reward.scorers.builtin import EnsembleScorer, RemoteScorer, VaderScorer
from flywheel.reward.scorers.transformer import TransformerRewardScorer

if TYPE_CHECKING:  # pragma: no cover
    from flywheel.reward.settings import RewardSettings

ENTRY_POINT_GROUP = "flywheel.scorers"
PLUGIN_ENV_PREFIX = "FLYWHEEL_REWARD_PLUGIN_"
BUILTIN = ("transformer", "vader", "remote")


# -- plugins ------------------------------------------------------------------------------------

def plugin_names() -> list[str]:
    """Entry-point names of the installed scorer plugins."""
    return sorted(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_plugin(ref: str) -> Callable[..., Any]:
    """The object an entry-point name or a `module:attribute` reference points to."""
    if ":" in ref:
        module_name, _, attribute = ref.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"scorer {ref!r}: cannot import {module_name!r} ({exc})") from exc
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ValueError(f"scorer {ref!r}: {module_name!r} has no attribute {attribute!r}")
            target = getattr(target, part)
        return target  # type: ignore[no-any-return]
    matches = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
    if not matches:
        known = ", ".join([*BUILTIN, "ensemble", *plugin_names()])
        raise ValueError(f"unknown scorer {ref!r} (known: {known}; or give module:Class)")
    return matches[0].load()  # type: ignore[no-any-return]


def read_plugin_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = Path(path).read_text()
    data = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"plugin config {path} must hold a table/object of settings")
    return data


def create_plugin(target: Callable[..., Any], config: dict[str, Any] | None = None) -> Scorer:
    """Instantiate a plugin, handing it its own settings when it declares a `settings_class`."""
    settings_class = getattr(target, "settings_class", None)
    if settings_class is not None:
        scorer = target(settings_class(_env_prefix=PLUGIN_ENV_PREFIX, **(config or {})))
    else:
        scorer = target()
    if not isinstance(scorer, Scorer):
        raise TypeError(f"scorer plugin {target!r} returned {type(scorer).__name__}, not a flywheel Scorer")
    return scorer


# -- selection by settings ----------------------------------------------------------------------

def parse_ensemble(spec: str) -> list[tuple[str, float]]:
    """'transformer=0.8,vader=0.2' -> [('transformer', 0.8), ('vader', 0.2)]; members may be plugins."""
    members = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        kind, _, weight = part.rpartition("=") if "=" in part else (part, "", "")
        kind = kind.strip()
        if not kind or kind == "ensemble":
            raise ValueError(f"bad ensemble member {part!r} (member=weight; members are scorers, not ensembles)")
        try:
            members.append((kind, float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise ValueError(f"ensemble member {kind!r}: weight {weight!r} is not a number") from None
    if not members:
        raise ValueError("reward_ensemble is empty")
    return members


def transformer_from_settings(settings: "RewardSettings", model_uri: str | None = None) -> TransformerRewardScorer:
    uri = model_uri if model_uri is not None else settings.reward_model_uri
    cache = Path(settings.reward_model_cache_dir) if settings.reward_model_cache_dir else settings.home / "reward-models"
    return TransformerRewardScorer(uri, max_length=settings.reward_max_length,
                                   max_batch_size=settings.reward_max_batch_size,
                                   forward_overhead_tokens=settings.reward_forward_overhead_tokens,
                                   cache_dir=cache, dtype=settings.reward_dtype)


def _single(kind: str, settings: "RewardSettings") -> Scorer:
    if kind == "transformer":
        return transformer_from_settings(settings)
    if kind == "vader":
        return VaderScorer(max_words=settings.reward_vader_max_words)
    if kind == "remote":
        from flywheel.runtime.tls import TlsFiles

        return RemoteScorer(settings.reward_remote_target, timeout_s=settings.reward_remote_timeout_s,
                            retries=settings.reward_remote_retries, api_key=settings.reward_remote_api_key,
                            credentials=TlsFiles.from_settings(settings).grpc_channel_credentials())
    return create_plugin(load_plugin(kind), read_plugin_config(settings.reward_plugin_config_file))


def build_scorer(settings: "RewardSettings") -> Scorer:
    kind = settings.reward_scorer.strip()
    if kind.lower() in (*BUILTIN, "ensemble"):
        kind = kind.lower()
    if kind == "ensemble":
        return EnsembleScorer([(_single(k, settings), w) for k, w in parse_ensemble(settings.reward_ensemble)])
    return _single(kind, settings)
