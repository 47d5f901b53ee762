"""OmegaConf stops here: schema (runtime's dataclasses) + preset YAML + dotlist overrides -> GenerateConfig.

Merge order, lowest first: schema defaults, the preset's `defaults`, the checkpoint's defaults (flow_shift from
a diffusers `scheduler/scheduler_config.json`), the command line. With `model.path` the architecture comes from
the checkpoint's config; an explicitly set `model.preset` must agree with it. Every user error is a
ValueError/TypeError naming the key and the fix, raised before any process group or weight load.
"""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from runtime import PRESETS, GenerateConfig
from runtime.checkpoint import arch_mismatches, resolve_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALIASES = {"VSA_sparsity": "attention.sparsity", "attention.VSA_sparsity": "attention.sparsity"}


def all_keys(schema: Any = GenerateConfig, prefix: str = "") -> dict[str, Any]:
    """Flattened `key -> default` of the schema, e.g. {"attention.sparsity": 0.9, ...}."""
    keys: dict[str, Any] = {}
    instance = schema() if isinstance(schema, type) else schema
    for f in fields(instance):
        value = getattr(instance, f.name)
        if is_dataclass(value):
            keys.update(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = value
    return keys


def load_preset(name: str) -> tuple[dict, dict]:
    """(architecture, generation defaults) of a preset in configs/models/."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown. Set model.preset to one of: {', '.join(PRESETS)}.")
    data = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "models" / f"{name}.yaml"))
    arch = dict(data["arch"])
    arch["patch_size"] = tuple(arch["patch_size"])
    return arch, dict(data.get("defaults") or {})


def parse_overrides(argv: list[str]) -> list[str]:
    """Validate `key=value` syntax, apply aliases and reject unknown keys with the closest suggestion."""
    known = all_keys()
    dotlist = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise ValueError(f"argument {arg!r} is not of the form key=value (e.g. attention.sparsity=0.9).")
        key = ALIASES.get(key, key)
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + list(ALIASES), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else " Run with --help to list every key."
            raise ValueError(f"unknown config key {key!r}.{hint}")
        dotlist.append(f"{key}={value}")
    return dotlist


def resolve_config(argv: list[str]) -> tuple[GenerateConfig, dict]:
    """Command-line overrides -> (validated-type GenerateConfig, preset architecture dict)."""
    overrides = OmegaConf.from_dotlist(parse_overrides(argv))
    preset = OmegaConf.select(overrides, "model.preset", default=GenerateConfig().model.preset)
    arch, preset_defaults = load_preset(str(preset))
    path = OmegaConf.select(overrides, "model.path", default=None)
    path = None if path is None else str(path)
    preset_is_explicit = OmegaConf.select(overrides, "model.preset", default=None) is not None
    arch, checkpoint_defaults = resolve_model(str(preset), arch, preset_is_explicit, path)
    if path is not None and not preset_is_explicit:
        # No preset given: the preset with the checkpoint's architecture supplies the generation defaults.
        inferred = next((name for name in PRESETS if not arch_mismatches(load_preset(name)[0], arch)), None)
        if inferred is not None and inferred != preset:
            preset, preset_defaults = inferred, load_preset(inferred)[1]
            overrides = OmegaConf.merge(overrides, {"model": {"preset": inferred}})
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(GenerateConfig), preset_defaults, checkpoint_defaults, overrides
        )
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as err:  # unknown keys are caught above; this is a preset file error
        raise ValueError(f"bad key in preset {preset!r}: {err.msg}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise TypeError(f"{key}: {err.msg}. Check the type of {key} (see --help for its default).") from None
    return cfg, arch


def help_text() -> str:
    lines = [
        "usage: [torchrun --nproc_per_node=N] launch/generate.py [key=value ...]",
        "",
        "Generate a video with a Wan2.1 DiT. Every key and its default (presets may change generation defaults):",
    ]
    for key, default in all_keys().items():
        lines.append(f"  {key:<26} {default!r}")
    lines += [
        "",
        f"presets (model.preset): {', '.join(PRESETS)}",
        "alias: VSA_sparsity=<x> is attention.sparsity=<x>",
        "example: torchrun --nproc_per_node=2 launch/generate.py parallel.sp=2 prompt='a red fox in snow'",
    ]
    return "\n".join(lines)
