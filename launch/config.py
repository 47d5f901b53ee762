"""OmegaConf stops here: schema (runtime's dataclasses) + preset YAML + dotlist overrides -> GenerateConfig.

Merge order, lowest first: schema defaults, the preset's `defaults`, the checkpoint's defaults (flow_shift from
a diffusers `scheduler/scheduler_config.json`; the DMD sampler for a FastWan checkpoint), the command line. With
`model.path` the architecture comes from the checkpoint's config; an explicitly set `model.preset` must agree with
it. Every user error is a ValueError/TypeError naming the key and the fix, raised before any process group or weight
load. `prompt` and `negative_prompt` are taken verbatim (never parsed as YAML); `parallel.sp=auto` becomes an int
here; with `scheduler=dmd`, num_steps follows `dmd_timesteps` and CFG is off.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from tessera.runtime import PRESETS, GenerateConfig, family_for
from tessera.runtime.config import fix_example, schema_field
from tessera.runtime.output import next_numbered_path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALIASES = {"VSA_sparsity": "attention.sparsity", "attention.VSA_sparsity": "attention.sparsity",
           "sla_topk": "attention.sla_topk"}
# Free text, taken verbatim: never parsed as YAML ("a fox: running" stays text, `negative_prompt=` is "").
TEXT_KEYS = ("prompt", "negative_prompt")
# What a value of each annotated schema type looks like, for type errors.
_KINDS = {
    "int": "a whole number", "float": "a number", "bool": "true or false", "str": "a single word",
    "str | None": "a path or null", "int | str": "auto or a whole number", "list[int]": "a list of whole numbers",
    "float | None": "a number or null",
}


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


def resolve_config(
    argv: list[str], world_size: int = 1, *, checkpoint: Any = None
) -> tuple[GenerateConfig, Any]:
    """Command-line overrides -> (validated-type GenerateConfig, the model family's typed architecture config: the
    checkpoint's, else the preset's).

    `world_size` is the number of ranks (torchrun's WORLD_SIZE): `parallel.sp=auto` becomes world_size //
    parallel.cfg here, so everything after launch sees an int (`validate(world_size=...)` reports a misfit).
    `checkpoint`: `model.path` already resolved (a launch's or a loaded pipeline's), used instead of reading the
    checkpoint's JSON and headers again when it is the same path."""
    cfg, model_cfg, _ = resolve_launch(argv, world_size, checkpoint=checkpoint)
    return cfg, model_cfg


def resolve_launch(
    argv: list[str], world_size: int = 1, *, checkpoint: Any = None
) -> tuple[GenerateConfig, Any, Any]:
    """`resolve_config`, and the resolved checkpoint of `model.path` (None without one): resolved here once, to be
    passed down to the pre-flight checks and the pipeline."""
    dotlist = parse_overrides(argv)
    text, overrides = _parse_values(dotlist)
    preset = OmegaConf.select(overrides, "model.preset", default=GenerateConfig().model.preset)
    arch, preset_defaults = load_preset(str(preset))
    path = OmegaConf.select(overrides, "model.path", default=None)
    path = None if path is None else str(path)
    preset_is_explicit = OmegaConf.select(overrides, "model.preset", default=None) is not None
    family = family_for(path, str(preset))  # the model family of the checkpoint (or of the preset)
    ckpt = family.checkpoint_at(path, checkpoint)
    arch, checkpoint_defaults = family.resolve_model(str(preset), arch, preset_is_explicit, path,
                                              preset_boundary_ratio=_boundary_ratio(preset_defaults), checkpoint=ckpt)
    if path is not None and not preset_is_explicit:
        # No preset given: the preset with the checkpoint's architecture, sampler and number of experts supplies the
        # generation defaults.
        inferred = _preset_of(family, arch, dmd=checkpoint_defaults.get("scheduler") == "dmd",
                              two_experts=_boundary_ratio(checkpoint_defaults) is not None)
        inferred = _resolution_variant(inferred, path)
        if inferred is not None and inferred != preset:
            preset, preset_defaults = inferred, load_preset(inferred)[1]
            overrides = OmegaConf.merge(overrides, {"model": {"preset": inferred}})
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(GenerateConfig), preset_defaults, checkpoint_defaults, overrides
        )
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as err:  # unknown keys are caught above; this is a preset file error
        raise ValueError(f"bad key in preset {preset!r}: {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        raise _type_error(err, dict(item.split("=", 1) for item in dotlist)) from None
    cfg = _follow_sampler(replace(cfg, **text).resolved(world_size), dotlist)
    # model.boundary_ratio set by hand must match the checkpoint (cheap: JSON and safetensors headers), and so must
    # the size and image (TI2V-5B: multiples of 32 pixels; FastWan2.2-TI2V-5B: no image)
    ckpt = family.checkpoint_at(cfg.model.path, ckpt)
    family.check_expert_config(cfg.model.boundary_ratio, ckpt)
    family.check_checkpoint_request(ckpt, height=cfg.height, width=cfg.width, preset=cfg.model.preset,
                                    image=None if cfg.image is None else str(cfg.image))
    if cfg.output.path is None:  # each run gets a new file; an explicit path is never silently renamed
        cfg = replace(cfg, output=replace(cfg.output, path=str(next_numbered_path())))
    return cfg, family.config(arch), ckpt  # the typed architecture from here on


def _preset_of(family, arch: dict, dmd: bool, two_experts: bool = False) -> str | None:
    """The first preset with this architecture whose sampler is DMD exactly when the checkpoint's is and which has
    two experts exactly when it has (a FastWan checkpoint gets the fastwan preset of its size, a Wan2.1 one the
    wan2.1 preset, a Wan2.2 A14B one wan2.2-t2v-a14b)."""
    for name in family.presets:
        preset_arch, defaults = load_preset(name)
        if (not family.arch_mismatches(preset_arch, arch) and (defaults.get("scheduler") == "dmd") == dmd
                and (_boundary_ratio(defaults) is not None) == two_experts):
            return name
    return None


def _resolution_variant(preset: str | None, path: str) -> str | None:
    """Presets that differ only in resolution share an architecture (wan2.1-i2v-14b-480p / -720p): the one whose tag
    the checkpoint's directory name holds (Wan2.1-I2V-14B-720P-Diffusers -> 720p), else `preset`."""
    if preset is None or not re.search(r"-\d+p$", preset):
        return preset
    stem, folder = preset.rsplit("-", 1)[0], Path(path).name.lower()
    return next((name for name in PRESETS if name.rsplit("-", 1)[0] == stem and name.rsplit("-", 1)[1] in folder),
                preset)


def _boundary_ratio(defaults: dict) -> float | None:
    """`model.boundary_ratio` of a preset's or checkpoint's defaults: set for a two-expert model (Wan2.2 A14B)."""
    return (defaults.get("model") or {}).get("boundary_ratio")


def _follow_sampler(cfg: GenerateConfig, dotlist: list[str]) -> GenerateConfig:
    """scheduler=dmd: num_steps follows dmd_timesteps and CFG is off (guidance_scale 1), whatever the preset says;
    setting either key yourself is an error that says why."""
    if cfg.scheduler != "dmd":
        return cfg
    given = {item.partition("=")[0] for item in dotlist}
    if "num_steps" in given:
        raise ValueError(
            f"num_steps cannot be set with scheduler=dmd: the DMD sampler runs one step per entry of dmd_timesteps "
            f"(now {list(cfg.dmd_timesteps)}). Fix: drop num_steps and list the steps, e.g. "
            f"dmd_timesteps=[1000,757,522]."
        )
    for key in ("guidance_scale", "guidance_scale_2"):
        if key in given:
            raise ValueError(
                f"{key} cannot be set with scheduler=dmd: the DMD sampler is distilled without CFG (one conditional "
                f"forward per step, no negative prompt). Fix: drop {key}, or use scheduler=unipc."
            )
    return replace(cfg, num_steps=len(cfg.dmd_timesteps), guidance_scale=1.0, guidance_scale_2=None)


def _parse_values(dotlist: list[str]) -> tuple[dict[str, str], DictConfig]:
    """(verbatim free-text values, OmegaConf of the rest); one ValueError naming the key for unreadable syntax."""
    text, parsed = {}, []
    for item in dotlist:
        key, _, value = item.partition("=")
        if key in TEXT_KEYS:
            text[key] = value
            continue
        try:
            parsed.append(OmegaConf.from_dotlist([item]))
        except (yaml.YAMLError, OmegaConfBaseException):
            why = "its brackets do not match" if value.count("[") != value.count("]") else (
                "it is not a number, a word or a list such as [1,2] (expressions are not evaluated)"
            )
            raise ValueError(f"{key}={value} cannot be read: {why}. Fix: {fix_example(key)}.") from None
    return text, OmegaConf.merge(OmegaConf.create(), *parsed)


def _type_error(err: OmegaConfBaseException, given: dict[str, str]) -> TypeError:
    """A one-line TypeError naming the key, the value given and an example of the right syntax."""
    key = re.sub(r"\[\d+\]$", "", getattr(err, "full_key", None) or "")
    try:
        annotation = str(schema_field(key).type)
    except KeyError:
        return TypeError(f"{key or '?'}: {_first_line(err.msg)}. Check the type of {key or 'the value'} (see --help).")
    value = given.get(key, getattr(err, "value", "?"))
    return TypeError(f"{key}={value} must be {_KINDS.get(annotation, annotation)}. Fix: {fix_example(key)}.")


def _first_line(message: str) -> str:
    return message.splitlines()[0] if message else ""


def describe_keys(schema: Any = GenerateConfig, prefix: str = "") -> dict[str, str]:
    """Flattened `key -> one-line description`, from the schema's field metadata."""
    docs: dict[str, str] = {}
    for f in fields(schema):
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            docs.update(describe_keys(f.default_factory, f"{prefix}{f.name}."))
        else:
            docs[f"{prefix}{f.name}"] = f.metadata.get("help", "")
    return docs


def help_text(argv: list[str] | None = None) -> str:
    """Every key, grouped by section, with its description and its default under the preset named in `argv`."""
    requested = next((arg.split("=", 1)[1] for arg in reversed(argv or [])
                      if arg.strip().lstrip("+").startswith("model.preset=")), None)
    preset = requested if requested in PRESETS else GenerateConfig().model.preset
    defaults = {**all_keys(), **_flatten(load_preset(preset)[1]), "model.preset": preset}
    lines = [
        "usage: [torchrun --nproc_per_node=N] launch/generate.py [key=value ...]",
        "",
        "Generate a video with a Wan2.1 DiT. Defaults are those of model.preset=" + preset
        + " (add model.preset=<name> to --help for another preset's).",
    ]
    if requested is not None and requested not in PRESETS:
        lines.append(f"(model.preset={requested} is unknown; presets: {', '.join(PRESETS)})")
    docs = describe_keys()
    width = max(map(len, docs)) + 2
    section = None
    for key, doc in docs.items():
        name = f"{key.split('.')[0]}.*" if "." in key else "generation"
        if name != section:
            section = name
            lines += ["", f"{name}:"]
        lines.append(f"  {key:<{width}}{doc} (default: {_show(defaults[key])})")
    lines += [
        "",
        "aliases: VSA_sparsity=<x> is attention.sparsity=<x>, sla_topk=<x> is attention.sla_topk=<x>; prompt and "
        "negative_prompt are taken verbatim",
        "example: torchrun --nproc_per_node=2 launch/generate.py prompt='a red fox in snow' attention.backend=vsa",
    ]
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _show(value: Any) -> str:
    """A default as one would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return repr(value) if value == "" else str(value)


def to_overrides(keys: Mapping[str, Any], prefix: str = "") -> list[str]:
    """{"attention": {"sparsity": 0.9}, "seed": 3} -> ["attention.sparsity=0.9", "seed=3"] (the CLI's syntax)."""
    overrides = []
    for key, value in keys.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            overrides += to_overrides(value, f"{name}.")
        else:
            overrides.append(f"{name}={_format(value)}")
    return overrides


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def resolve_requests(
    argv: list[str], world_size: int = 1
) -> tuple[list[GenerateConfig], Any, Any]:
    """The launch's requests: one, or one per line of `prompts_file=` (each line a prompt, or a JSON object of
    per-request keys over the command line's). Every line is resolved and validated before anything loads; an
    error names the file, the line and the key. Outputs: `output.path` stem-001, -002, ... when given, else the
    next free numbers of outputs/video-NNN.mp4. Also the checkpoint, resolved once for all of them."""
    cfg, model_cfg, ckpt = resolve_launch(argv, world_size=world_size)
    cfg.validate(world_size=world_size)
    if cfg.prompts_file is None:
        return [cfg], model_cfg, ckpt
    lines = _read_prompt_lines(Path(cfg.prompts_file))
    explicit = any(arg.partition("=")[0].strip().lstrip("+") == "output.path" for arg in argv)
    base = Path(cfg.output.path)
    first = 0 if explicit else int(base.stem.rsplit("-", 1)[1])  # resolve_config picked the next free video-NNN
    requests = []
    for index, (line_no, overrides) in enumerate(lines):
        path = base.with_name(f"{base.stem}-{index + 1:03d}{base.suffix}") if explicit else base.with_name(
            f"video-{first + index:03d}{base.suffix}")
        try:
            if any(o.partition("=")[0] in ("model", "parallel") or o.startswith(("model.", "parallel.", "prompts_file"))
                   for o in overrides):
                raise ValueError("model.*, parallel.* and prompts_file are set once per launch, not per line")
            request, _ = resolve_config([*argv, f"output.path={path}", *overrides], world_size=world_size,
                                        checkpoint=ckpt)
            request.validate(world_size=world_size)
        except (ValueError, TypeError) as err:
            raise type(err)(f"prompts_file={cfg.prompts_file} line {line_no}: {err}") from None
        requests.append(request)
    return requests, model_cfg, ckpt


def _read_prompt_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, overrides) of every non-empty, non-# line: a plain line is the prompt, a {...} line JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"prompts_file={path} cannot be read ({err.strerror or err}). Fix: point it at a text "
                         f"file with one prompt per line") from None
    lines = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                keys = json.loads(line)
            except ValueError as err:
                raise ValueError(f"prompts_file={path} line {line_no}: not valid JSON ({err}). Fix: e.g. "
                                 f'{{"prompt": "a red fox", "seed": 3}}') from None
            if not isinstance(keys, dict):
                raise ValueError(f"prompts_file={path} line {line_no}: a JSON line must be an object of keys. Fix: "
                                 f'e.g. {{"prompt": "a red fox", "seed": 3}}')
            lines.append((line_no, to_overrides(keys)))
        else:
            lines.append((line_no, [f"prompt={line}"]))
    if not lines:
        raise ValueError(f"prompts_file={path} holds no prompt. Fix: one prompt per line, or JSON lines")
    return lines
