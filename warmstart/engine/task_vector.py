"""Load checkpoints as state dicts and take task vectors (finetuned minus pretrained weights).

A checkpoint is a ``.safetensors`` file, a torch ``.pt``/``.pth``/``.bin`` file (a raw state dict or
a dict with a ``state_dict`` or ``model`` entry), a Lightning ``.ckpt`` or a Hugging Face model
folder (``model.safetensors``, ``pytorch_model.bin`` or their sharded ``*.index.json`` forms).
Everything is read on CPU; pickles are read with ``weights_only=True`` and never run code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

StateSource = nn.Module | Mapping[str, Tensor] | str | os.PathLike

_EXPECTED = "expected a safetensors/.pt/.bin/.ckpt file or a Hugging Face model folder"
_HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SHOWN = 10


def _preview(keys: Iterable[str]) -> str:
    """``"a, b, ... (N in all)"`` with at most ``_SHOWN`` names, for error messages."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return f"{shown}{', ...' if len(keys) > _SHOWN else ''} ({len(keys)} in all)"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types and OSError
        raise ValueError(f"could not read checkpoint {path}: {err}; {_EXPECTED}") from err


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt pickles raise many types (EOFError, RuntimeError, ...)
        reason, hint = str(err), _EXPECTED
        if "Weights only load failed" in reason:
            # torch's message spans many lines; its "WeightsUnpickler error" line says what stopped
            # it: a Python object (e.g. "Unsupported global") or bytes that are no pickle at all
            # ("Unsupported operand", an invalid opcode)
            found = re.search(r"WeightsUnpickler error:\s*(.*?)(?: Please use|\n|$)", reason)
            reason = (found.group(1) if found and found.group(1) else "").rstrip(".")
            if reason and not reason.startswith("Unsupported operand"):
                hint = (
                    "it holds Python objects that torch.load(weights_only=True) refuses to run; if "
                    "you trust the file, load it with torch.load(path, weights_only=False) "
                    "yourself and pass its state dict (a Mapping) instead of the path"
                )
        if hint == _EXPECTED:
            first = reason.strip().splitlines()[0] if reason.strip() else type(err).__name__
            reason = f"the file is damaged or not a torch checkpoint ({first})"
        raise ValueError(f"could not read checkpoint {path}: {reason}; {hint}") from err


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Return the state dict inside a loaded pickle: raw, or under ``state_dict`` / ``model``."""
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model"):
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ValueError(
            f"checkpoint {path} holds {what}, not a state dict; expected a raw "
            "state dict or a dict with a 'state_dict' or 'model' entry"
        )
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ValueError(
            f"checkpoint {path} holds a dict whose entries {_preview(bad)} are not tensors; "
            "expected a raw state dict or a dict with a 'state_dict' or 'model' entry"
        )
    return dict(obj)


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _unwrap(_read_torch(path), path)


def _read_index(index: Path) -> dict[str, Tensor]:
    """Load every shard named in a Hugging Face ``*.index.json`` ``weight_map``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"could not read checkpoint index {index}: {err!r}; expected a JSON object with a "
            "'weight_map' from Hugging Face save_pretrained"
        ) from err
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(
                f"checkpoint shard {shard_path} listed in {index} does not exist; copy the whole "
                "model folder, with all its shards"
            )
        state.update(_read_file(shard_path))
    return state


def _read_folder(folder: Path) -> dict[str, Tensor]:
    for name in _HF_FILES:
        path = folder / name
        if path.is_file():
            return _read_index(path) if name.endswith(".json") else _read_file(path)
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"checkpoint folder {folder} has none of {', '.join(_HF_FILES)} (found: "
        f"{', '.join(found[:_SHOWN]) or 'nothing'}); pass a Hugging Face model folder written by "
        "save_pretrained, or the path of a weights file"
    )


def _strip_prefix(state: dict[str, Tensor], prefix: str | None, origin: str) -> dict[str, Tensor]:
    """Keep keys under ``prefix`` (``"model"`` and ``"model."`` mean the same) and strip it."""
    if not prefix:
        return state
    if not prefix.endswith("."):
        prefix += "."
    kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not kept:
        heads = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
        raise ValueError(
            f"prefix={prefix!r} matches no key of {origin} (keys: {_preview(state)}); pass one of "
            f"the prefixes it has ({', '.join(heads[:_SHOWN]) or 'none'}) or prefix=None"
        )
    return kept


def load_state_dict(path: str | os.PathLike, prefix: str | None = None) -> dict[str, Tensor]:
    """Read the weights of a checkpoint file or Hugging Face folder onto CPU.

    Args:
        path: a ``.safetensors``, ``.pt``/``.pth``/``.bin`` or Lightning ``.ckpt`` file, or a
            folder with ``model.safetensors`` / ``pytorch_model.bin`` (sharded or not).
        prefix: keep only keys starting with it and strip it, e.g. ``"model."`` for a
            LightningModule that holds the network as ``self.model``.

    Returns:
        name -> tensor, with the shapes stored in the checkpoint.

    Example:
        >>> state = load_state_dict("checkpoints/last.ckpt", prefix="model.")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of a safetensors/.pt/.bin/.ckpt "
            "file or of a Hugging Face model folder"
        )
    state = _read_folder(path) if path.is_dir() else _read_file(path)
    return _strip_prefix(state, prefix, f"checkpoint {path}")


def fit_prefix(state: Mapping[str, Tensor], names: Iterable[str], origin: str = "the checkpoint"
               ) -> dict[str, Tensor]:
    """The entries of ``state`` under the wrapper prefix that makes its keys fit ``names``.

    A checkpoint written from a user's LightningModule names the network's weights ``net.*``,
    ``model.model.*`` or the like; this finds the prefix (possibly none) whose stripped keys
    match the most of ``names`` (the shortest such prefix on ties), keeps the keys under it and
    strips it. When no prefix makes any key fit, the error shows keys from both sides.
    """
    wanted = set(names)
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for cut in range(len(parts)):
            prefix = ".".join(parts[:cut]) + ("." if cut else "")
            if ".".join(parts[cut:]) in wanted:
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        raise ValueError(
            f"no key of {origin} fits the source model, with or without a wrapper prefix "
            f"(checkpoint keys: {_preview(state)}; source model keys: {_preview(wanted)}); pass "
            "the checkpoint of a fine-tune of this source model"
        )
    prefix = min(counts, key=lambda p: (-counts[p], len(p)))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def as_state_dict(
    obj: StateSource, prefix: str | None = None, *, clone: bool = True
) -> dict[str, Tensor]:
    """Turn a module, a state dict or a checkpoint path into a plain ``dict[str, Tensor]``.

    A module gives a detached clone of its ``state_dict()`` (later training does not change it;
    ``clone=False`` shares its storage instead); a mapping is copied shallowly; a path goes
    through :func:`load_state_dict`.
    """
    if isinstance(obj, nn.Module):
        state = {
            k: v.detach().clone() if clone else v.detach() for k, v in obj.state_dict().items()
        }
        return _strip_prefix(state, prefix, f"module {type(obj).__name__}")
    if isinstance(obj, (str, os.PathLike)):
        return load_state_dict(obj, prefix=prefix)
    if isinstance(obj, Mapping):
        bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(
                f"state dict entries {_preview(bad)} are not tensors; pass a mapping of name -> "
                "Tensor, e.g. module.state_dict()"
            )
        return _strip_prefix(dict(obj), prefix, "the state dict")
    raise TypeError(
        f"cannot read weights from a {type(obj).__name__}; pass an nn.Module, a state dict "
        "(Mapping[str, Tensor]) or the path of a checkpoint"
    )


def _floats(state: Mapping[str, Tensor], ignore: set[str]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k not in ignore and v.is_floating_point()}


def _prefix_hint(pretrained: Mapping, finetuned: Mapping) -> str:
    """Name the wrapper prefix (e.g. ``model.``) when one side's keys are the other's plus it."""
    for name, longer, shorter in (
        ("pretrained", pretrained, finetuned),
        ("finetuned", finetuned, pretrained),
    ):
        heads = {k.split(".", 1)[0] for k in longer}
        if len(heads) == 1 and "." in next(iter(longer)):
            head = heads.pop() + "."
            stripped = {k[len(head) :] for k in longer}
            if set(shorter) <= stripped or stripped <= set(shorter):  # a task head may be left out
                return f" (the {name} keys all start with {head!r}: pass prefix={head!r})"
    return ""


def _key_error(pretrained: Mapping, finetuned: Mapping) -> ValueError:
    only_pre, only_ft = set(pretrained) - set(finetuned), set(finetuned) - set(pretrained)
    parts = []
    if only_pre:
        parts.append(f"only in pretrained: {_preview(only_pre)}")
    if only_ft:
        parts.append(f"only in finetuned: {_preview(only_ft)}")
    return ValueError(
        f"pretrained and finetuned have different floating-point keys ({'; '.join(parts)}); "
        "load matching checkpoints, strip a wrapper prefix with load_state_dict(..., "
        f"prefix='model.'){_prefix_hint(pretrained, finetuned)}, or list keys to skip in ignore="
    )


def _shape_error(bad: list[str], pretrained: Mapping, finetuned: Mapping) -> ValueError:
    shown = ", ".join(
        f"{k!r}: {list(pretrained[k].shape)} vs {list(finetuned[k].shape)}" for k in bad[:_SHOWN]
    )
    more = ", ..." if len(bad) > _SHOWN else ""
    return ValueError(
        f"pretrained and finetuned shapes differ for {len(bad)} keys ({shown}{more}; pretrained "
        "vs finetuned); a task vector needs the same architecture on both sides: check that both "
        "checkpoints come from the same model, or list the keys (e.g. a replaced head) in ignore="
    )


class LazyTaskVector(Mapping[str, Tensor]):
    """``finetuned - pretrained`` per key, computed when read and not kept: the difference of a
    whole model (float32, twice a bf16 model's size) is never held at once. Each read returns a
    new tensor; the two state dicts must not change while it is in use."""

    def __init__(self, pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> None:
        self._pre, self._ft = pretrained, finetuned

    def __getitem__(self, key: str) -> Tensor:
        base, tuned = self._pre[key], self._ft[key]
        dtype = torch.float64 if torch.float64 in (base.dtype, tuned.dtype) else torch.float32
        return tuned.detach().to("cpu", dtype) - base.detach().to("cpu", dtype)

    def __iter__(self):
        return iter(self._pre)

    def __len__(self) -> int:
        return len(self._pre)


def task_vector(
    pretrained: StateSource, finetuned: StateSource, *, ignore: Iterable[str] = (),
    lazy: bool = False,
) -> dict[str, Tensor] | LazyTaskVector:
    """``finetuned - pretrained`` for every floating-point tensor, on CPU.

    Integer and bool buffers (``num_batches_tracked``, index tables) are not weights and are
    dropped. Keys in ``ignore`` (exact names) are skipped on both sides. Each entry has the shape
    of its parameter, in float64 if either side is float64 and float32 otherwise.

    Args:
        pretrained: the base weights (module, state dict or checkpoint path).
        finetuned: the same architecture after fine-tuning.
        ignore: exact key names to leave out, e.g. a task head absent from the base model.
        lazy: return a :class:`LazyTaskVector` (each entry computed when read) instead of a dict.
    """
    ignore = {ignore} if isinstance(ignore, str) else set(ignore)
    pre = _floats(as_state_dict(pretrained, clone=False), ignore)  # the difference is a new tensor
    ft = _floats(as_state_dict(finetuned, clone=False), ignore)
    if set(pre) != set(ft):
        raise _key_error(pre, ft)
    bad = [k for k in pre if pre[k].shape != ft[k].shape]
    if bad:
        raise _shape_error(bad, pre, ft)
    vector = LazyTaskVector(pre, ft)
    return vector if lazy else {key: vector[key] for key in vector}
