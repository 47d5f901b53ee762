"""Stream Wan2.1 safetensors weights into a meta-device ``WanTransformer``, tensor by tensor.

Accepts the diffusers layout (loaded as is) and the native Wan2.1 layout (``blocks.N.self_attn.q`` ...,
renamed on load; I2V's ``img_emb.proj.*`` and ``cross_attn.{k_img,v_img,norm_k_img}`` too); single files,
sharded checkpoints with ``*.index.json``, or a directory of either.
Every key and shape is checked from the file headers before any tensor is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from safetensors import safe_open
from tessera.models.wan.config import wan_param_dtype
from tessera.models.wan.transformer import WanTransformer, set_parameter_

_MAX_LISTED = 10  # keys shown per category in an error message before "... and N more"
_COMFY_PREFIX = "model.diffusion_model."

# Native Wan2.1 -> diffusers names outside the blocks (prefix replacements, first match wins).
_NATIVE_TOP = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    # I2V image embedder: LayerNorm, Linear, GELU, Linear, LayerNorm (as diffusers' single-file converter maps it).
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
)
# Native -> diffusers names inside ``blocks.N.`` (prefix replacements on the rest of the name).
_NATIVE_BLOCK = (
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.", "attn1."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),  # I2V: the image tokens' keys, values and key norm
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("cross_attn.", "attn2."),
    ("norm3.", "norm2."),  # native norm3 is the affine cross-attention norm = diffusers norm2
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
)
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")
# SLA checkpoints' linear-branch projection, under the names their trainers used (after the native renaming,
# ``self_attn.`` is already ``attn1.``): all become ``blocks.N.attn1.proj_l.*``, ``WanAttention.proj_l``.
_SLA_PROJ_L = re.compile(r"^blocks\.(\d+)\.attn1\.(?:attn_impl|attn_op\.local_attn|local_attn)\.proj_l\.(weight|bias)$")
_NET_PREFIX = "net."  # SLA (TurboWan) checkpoints prefix every key with it


@dataclass(frozen=True)
class LoadReport:
    """What ``load_wan_weights_`` did: files read, layout detected, tensors loaded, parameters zero-filled."""

    files: tuple[str, ...]
    layout: str  # "diffusers" | "native"
    num_tensors: int
    num_bytes: int  # bytes of the loaded parameters on the device
    zero_initialised: tuple[str, ...]  # model parameters absent from the checkpoint, filled with zeros


def native_to_diffusers_name(key: str) -> str:
    """Map one native Wan2.1 parameter name to its diffusers name (unknown names pass through)."""
    key = key.removeprefix(_NET_PREFIX)
    match = _BLOCK_KEY.match(key)
    if match is None:
        table, head, rest = _NATIVE_TOP, "", key
    else:
        table, head, rest = _NATIVE_BLOCK, f"blocks.{match.group(1)}.", match.group(2)
    for old, new in table:
        if rest.startswith(old):
            return head + new + rest[len(old) :]
    return key


def canonical_sla_name(key: str) -> str:
    """``blocks.N.attn1.<any SLA spelling>.proj_l.{weight,bias}`` -> ``blocks.N.attn1.proj_l.*``; others unchanged."""
    match = _SLA_PROJ_L.match(key)
    return key if match is None else f"blocks.{match.group(1)}.attn1.proj_l.{match.group(2)}"


def _is_native_layout(keys: Sequence[str]) -> bool:
    markers = (".self_attn.", ".cross_attn.", "head.head.", "time_embedding.", "text_embedding.")
    return any(marker in key or key.startswith(marker) for key in keys for marker in markers)


def _resolve_files(path_or_files: str | PathLike | Sequence[str | PathLike]) -> list[Path]:
    if isinstance(path_or_files, (str, PathLike)):
        path = Path(path_or_files)
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if len(indexes) > 1:
                raise ValueError(
                    f"{path} holds several index files {[p.name for p in indexes]}; pass one of them"
                )
            if indexes:
                return _resolve_files(indexes[0])
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors or *.safetensors.index.json in directory {path}")
            return files
        if not path.is_file():
            raise ValueError(
                f"weights path {path} does not exist; pass a .safetensors file, an index or a directory"
            )
        if path.name.endswith(".json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path} is not a safetensors index (needs a 'weight_map' object): {err}"
                ) from err
            return [path.parent / name for name in dict.fromkeys(weight_map.values())]
        return [path]
    files = [Path(p) for p in path_or_files]
    if not files:
        raise ValueError("load_wan_weights_ got an empty list of files")
    return files


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """file key -> (file, key in file, shape), reading only the headers."""
    entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"safetensors file {file} does not exist (listed by the index or the caller)")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    name = key[len(_COMFY_PREFIX) :] if key.startswith(_COMFY_PREFIX) else key
                    if name in entries:
                        raise ValueError(f"tensor {key!r} appears in both {entries[name][0]} and {file}")
                    entries[name] = (file, key, tuple(handle.get_slice(key).get_shape()))
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
            raise ValueError(f"cannot read safetensors file {file} (corrupt or truncated?): {err}") from err
    return entries


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _raise_on_nonfinite_synced(names: list[str], finite_flags: list[torch.Tensor], files: list[Path]) -> None:
    """ValueError naming every tensor holding NaN/Inf; one host sync for the whole checkpoint."""
    if not finite_flags:
        return
    bad = [name for name, ok in zip(names, torch.stack(finite_flags).tolist(), strict=True) if not ok]
    if bad:
        where = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ValueError(
            f"checkpoint {where} has NaN/Inf values in " + _listing("tensors", bad)
            + ". The file is corrupt or was saved after a diverged run: re-download or re-export it."
        )


@torch.no_grad()
def load_wan_weights_(
    model: WanTransformer,
    path_or_files: str | PathLike | Sequence[str | PathLike],
    device: torch.device | str,
    dtype: torch.dtype,
    allow_missing_gate: bool = True,
) -> LoadReport:
    """Load a checkpoint into ``model`` (typically from ``build_wan_on_meta``), strictly, in place.

    Each tensor goes file -> ``device`` in ``dtype`` (fp32 for diffusers' keep-in-fp32 parameters), one at
    a time. Missing/unexpected keys and shape mismatches raise ONE ValueError listing them before any
    tensor is read. ``attn1.to_gate_compress`` may be absent when ``allow_missing_gate``: zero-filled
    (VSA's coarse branch off) and listed in ``LoadReport.zero_initialised``.
    """
    files = _resolve_files(path_or_files)
    entries = _read_headers(files)
    layout = "native" if _is_native_layout(list(entries)) else "diffusers"
    if layout == "native":
        entries = {native_to_diffusers_name(name): entry for name, entry in entries.items()}
    entries = {canonical_sla_name(name.removeprefix(_NET_PREFIX)): entry for name, entry in entries.items()}

    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    missing = [name for name in expected if name not in entries]
    zero_init = [name for name in missing if allow_missing_gate and ".to_gate_compress." in name]
    missing = [name for name in missing if name not in zero_init]
    unexpected = [name for name in entries if name not in expected]
    mismatched = [
        f"{name} checkpoint {list(entries[name][2])} vs model {list(shape)}"
        for name, shape in expected.items()
        if name in entries and entries[name][2] != shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        hint = ""
        if any("to_gate_compress" in name for name in unexpected):
            hint = " The checkpoint has VSA gate weights: set gate_compress=True in the model config."
        if any(".proj_l." in name for name in unexpected):
            hint += " The checkpoint has SLA proj_l weights: set sla_proj_l=True in the model config."
        where = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ValueError(
            f"checkpoint {where} ({layout} layout) does not match the model config {model.config}: "
            + "; ".join(problems)
            + ". Fix: choose the model preset that matches this checkpoint (layers, heads, head dim, ffn_dim,"
            " text_dim) or point at the right weights." + hint
        )

    num_bytes = 0
    finite_flags: list[torch.Tensor] = []  # one isfinite reduction per tensor, on the device; read once below
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key, _) in entries.items():
        by_file.setdefault(file, []).append((name, key))
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name, key in names:
                    # copy=True: own, aligned storage even on CPU (not a view into the file's buffer).
                    tensor = handle.get_tensor(key).to(
                        device=device, dtype=wan_param_dtype(name, dtype), copy=True
                    )
                    set_parameter_(model, name, tensor)
                    finite_flags.append(torch.isfinite(tensor).all())
                    num_bytes += tensor.numel() * tensor.element_size()
        except Exception as err:
            raise ValueError(f"failed reading tensors from safetensors file {file}: {err}") from err
    names = [name for names_in_file in by_file.values() for name, _ in names_in_file]
    _raise_on_nonfinite_synced(names, finite_flags, files)
    for name in zero_init:
        tensor = torch.zeros(expected[name], device=device, dtype=wan_param_dtype(name, dtype))
        set_parameter_(model, name, tensor)
        num_bytes += tensor.numel() * tensor.element_size()
    return LoadReport(
        files=tuple(str(f) for f in files),
        layout=layout,
        num_tensors=len(entries),
        num_bytes=num_bytes,
        zero_initialised=tuple(zero_init),
    )
