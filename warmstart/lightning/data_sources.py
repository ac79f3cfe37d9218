"""Where the rows come from: data files (CSV / TSV / parquet / JSON(L)), the offline packaged
data sets and the column checks shared by the DataModules in ``warmstart.lightning.data``."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import datasets
import numpy as np

from warmstart.lightning import assets

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def read_table(path: str | os.PathLike) -> datasets.Dataset:
    """One CSV / TSV / parquet / JSON(L) file (optionally compressed) as a ``Dataset``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; check the path")
    suffixes = [s for s in path.suffixes if s not in _COMPRESSED]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise ValueError(f"cannot read {str(path)!r}: unknown file type; use one of "
                         f"{', '.join(_BUILDERS)} (optionally {', '.join(_COMPRESSED)})")
    kwargs = {"sep": "\t"} if suffixes[-1] == ".tsv" else {}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def check_columns(ds: datasets.Dataset, source: str, **columns: str) -> None:
    """``ValueError`` naming the argument and the column when ``ds`` lacks one of ``columns``."""
    for argument, column in columns.items():
        if column not in ds.column_names:
            raise ValueError(f"{argument}={column!r} is not a column of {source!r}; available "
                             f"columns: {', '.join(ds.column_names)}; pass one of them")


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> datasets.Dataset:
    """The packaged 5,000 MNIST digits: ``image`` uint8 [28, 28], ``label`` 0..9."""
    names = [f"pixel{i}" for i in range(784)] + ["label"]
    csv = str(assets.mnist5k_csv())
    table = datasets.load_dataset("csv", data_files=csv, column_names=names, split="train").data
    pixels = np.stack([table.column(n).to_numpy() for n in names[:-1]], axis=1)  # [N, 784]
    features = datasets.Features(image=datasets.Array2D((28, 28), "uint8"),
                                 label=datasets.Value("int64"))
    data = {"image": pixels.astype(np.uint8).reshape(-1, 28, 28),
            "label": table.column("label").to_numpy()}
    return datasets.Dataset.from_dict(data, features=features)


@functools.lru_cache(maxsize=1)
def load_rotten_tomatoes() -> datasets.Dataset:
    """The packaged Rotten Tomatoes snippets: ``text``, ``label`` (fresh=1, rotten=0); plot
    sentences are dropped (12,808 rows: 7,403 fresh, 5,405 rotten)."""
    raw = datasets.load_dataset("csv", data_files=str(assets.rotten_tomatoes_csv()), split="train")
    reviews = raw.filter(lambda b: [c in ("fresh", "rotten") for c in b["category"]],
                         batched=True, keep_in_memory=True)
    return reviews.map(lambda b: {"label": [int(c == "fresh") for c in b["category"]]},
                       batched=True, keep_in_memory=True).select_columns(["text", "label"])


def _rename(ds: datasets.Dataset, source: str, **columns: str) -> datasets.Dataset:
    """Keep ``columns`` (``image_column="img"`` ...) renamed to their role (``image`` ...)."""
    check_columns(ds, source, **columns)
    ds = ds.select_columns(list(columns.values()))
    return ds.rename_columns({c: a.removesuffix("_column") for a, c in columns.items()
                              if c != a.removesuffix("_column")})


def _unknown_source(source: str, packaged: str) -> ValueError:
    return ValueError(f"source={source!r} is neither the packaged {packaged!r} nor an existing "
                      f"file or folder; pass {packaged!r} or a path to a data file or folder")


def _image_paths(ds: datasets.Dataset, column: str, root: Path) -> datasets.Dataset:
    """Cast a column of image paths (relative to ``root``) to ``datasets.Image``."""
    if isinstance(ds.features[column], datasets.Image):
        return ds
    if getattr(ds.features[column], "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"image_column={column!r} holds {ds.features[column]}, not image paths")
    paths = [str(root / p) for p in ds[column]]  # absolute paths stay absolute
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image files named in column {column!r} do "
                                f"not exist, e.g. {missing[0]!r}; paths start at {str(root)!r}")
    ds = ds.remove_columns(column).add_column(column, paths)
    return ds.cast_column(column, datasets.Image())
