"""LightningDataModules over Hugging Face ``datasets``: local files and the offline packaged data.

Every module reads its whole source once, maps labels to ``0..C-1`` (sorted original values, or
the order of ``classes`` when only some classes are kept), carves a seeded validation split out of
the training data and batches into dicts:
images ``{"image": [B, 3, S, S] float32, "label": [B] int64}``; text ``{"input_ids",
"attention_mask": [B, L] int64, "label": [B] int64, "text": list[str]}`` (the raw text stays so
that a model with another tokenizer can re-tokenize the same examples).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import datasets
import lightning
import numpy as np
import torch
from datasets.fingerprint import Hasher
from torchdata.stateful_dataloader import StatefulDataLoader

from warmstart.lightning.collate import (
    ImageCollate,
    TextCollate,
    image_data_config,
)
from warmstart.lightning.data_sources import (
    _image_paths,
    _rename,
    _unknown_source,
    check_columns,
    load_mnist5k,
    load_rotten_tomatoes,
    read_table,
)


class _SplitData(lightning.LightningDataModule):
    """Shared source reading, label indexing, seeded train/val split and loaders."""

    def __init__(self, source: str, batch_size: int, val_size: float | int,
                 train_limit: int | None, val_limit: int | None, test_source: str | None,
                 num_workers: int, seed: int, classes: list[Any] | None = None) -> None:
        super().__init__()
        _require(batch_size >= 1, f"batch_size={batch_size} must be >= 1")
        _require(isinstance(val_size, int) and val_size >= 1 or isinstance(val_size, float)
                 and 0 < val_size < 1,
                 f"val_size={val_size!r} must be a fraction in (0, 1) or a row count >= 1")
        for name, limit in (("train_limit", train_limit), ("val_limit", val_limit)):
            _require(limit is None or limit >= 1, f"{name}={limit} must be >= 1 or None")
        _require(num_workers >= 0, f"num_workers={num_workers} must be >= 0")
        _require(classes is None or len(classes) >= 1 and len(set(classes)) == len(classes),
                 f"classes={classes!r} must be None (all classes) or a non-empty list of "
                 "distinct label values")
        self.source, self.test_source = source, test_source
        self.keep_classes = None if classes is None else list(classes)
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.train_limit, self.val_limit, self.num_workers = train_limit, val_limit, num_workers
        self._corpus: tuple[datasets.Dataset, datasets.Dataset | None] | None = None
        self._splits: dict[str, datasets.Dataset] | None = None
        self._classes: list[Any] = []
        self._all_classes: list[Any] = []  # before `classes` filters them

    # subclasses: `_read(source) -> (corpus, test split in source or None)` with renamed columns,
    # `_finish(split) -> split` ready for the DataLoader, and a `collate` callable
    collate: Any

    def corpus(self) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """The whole training corpus and the test split (if any), read once."""
        if self._corpus is None:
            train, test = self._read(self.source)
            if self.test_source is not None:
                test = self._read(self.test_source)[0]
            found = _classes(train, self.source)
            test = None if test is None else _align(test, found)
            if self.keep_classes is not None:
                # The test split was aligned to every training class first, so a ClassLabel
                # integer means the same class in both splits when the rows are filtered.
                train, test = (_keep(d, self.keep_classes, found, self.source)
                               if d is not None else None for d in (train, test))
            self._all_classes = found
            self._classes = found if self.keep_classes is None else self.keep_classes
            self._corpus = (train, test)
        return self._corpus

    @property
    def classes(self) -> list[Any]:
        """The original label values, by class index: class ``i`` is ``classes[i]`` (sorted, or
        the ``classes`` argument as given)."""
        self.corpus()
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def label_index(self) -> dict[Any, int]:
        """Label value -> class index; ``ClassLabel`` data (image folders) also map int -> int."""
        train = self.corpus()[0]
        index = {value: i for i, value in enumerate(self.classes)}
        if isinstance(train.features["label"], datasets.ClassLabel):  # stored ints: their names
            index.update({self._all_classes.index(v): i for i, v in enumerate(self.classes)})
        return index

    def prepare_data(self) -> None:
        # Local files only: reading once here fills the `datasets` cache before ranks start.
        self._read(self.source)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        train, test = self.corpus()
        n_val = self.val_size
        if isinstance(n_val, float):
            n_val = round(n_val * len(train))
        if not 1 <= n_val < len(train):
            raise ValueError(f"val_size={self.val_size} gives {n_val} validation rows out of "
                             f"{len(train)}; pass a fraction in (0, 1) or a count in [1, N - 1]")
        # the permutation of `Dataset.train_test_split`, without its on-disk index cache files
        order = np.random.default_rng(self.seed).permutation(len(train))
        self._splits = {"train": self._finish(train.select(order[n_val:][: self.train_limit])),
                        "val": self._finish(train.select(order[:n_val][: self.val_limit]))}
        self._splits["test"] = self._splits["val"] if test is None else self._finish(test)

    def split(self, name: str) -> datasets.Dataset:
        """The prepared ``"train"`` / ``"val"`` / ``"test"`` split (calls ``setup`` if needed)."""
        self.setup()
        return self._splits[name]

    def _loader(self, name: str, shuffle: bool) -> StatefulDataLoader:
        # The split depends on `seed` only; the shuffle order also follows the global seed
        # (`seed_everything`), so runs with different seeds see the data in different orders.
        # Stateful: Lightning stores the loader's position in each checkpoint, so a fit resumed
        # from a mid-epoch checkpoint continues with the next batch instead of the epoch's first.
        generator = (torch.Generator().manual_seed(self.seed * 1_000_003 + torch.initial_seed())
                     if shuffle else None)
        with warnings.catch_warnings():
            # torchdata 0.11's constructor calls a torch function that newer torch releases
            # deprecate; the warning says nothing about the user's run. Filtered here, not at
            # import: compare._cli first imports this module inside a warnings context, whose
            # exit drops the filters added within it.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            return StatefulDataLoader(self.split(name), batch_size=self.batch_size,
                                      shuffle=shuffle, generator=generator,
                                      collate_fn=self.collate, num_workers=self.num_workers,
                                      persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False)


def _classes(ds: datasets.Dataset, source: str) -> list[Any]:
    """Sorted label values (``ClassLabel``: its names, already sorted by the folder loader)."""
    if isinstance(ds.features["label"], datasets.ClassLabel):
        return list(ds.features["label"].names)
    values = ds.unique("label")
    if None in values:
        raise ValueError(f"the label column of {source!r} has empty values; drop or fill them")
    return sorted(values)


def _align(test: datasets.Dataset, classes: list[Any]) -> datasets.Dataset:
    """Check that the test labels are known and give ``ClassLabel`` ints the training order."""
    feature = test.features["label"]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    unseen = set(feature.names if is_class_label else test.unique("label")) - set(classes)
    if unseen:
        raise ValueError(f"the test split has labels {sorted(unseen, key=str)} that the "
                         f"training data lacks (known: {classes})")
    if is_class_label and feature.names != classes:
        test = test.align_labels_with_mapping({c: i for i, c in enumerate(classes)}, "label")
    return test


def _keep(ds: datasets.Dataset, keep: list[Any], found: list[Any], source: str
          ) -> datasets.Dataset:
    """The rows of ``ds`` whose label is one of ``keep`` (label values as in ``found``)."""
    unknown = [c for c in keep if c not in found]
    if unknown:
        raise ValueError(f"classes={keep!r} names labels {unknown} that {source!r} lacks "
                         f"(its labels: {found})")
    labels = np.asarray(ds["label"])
    if isinstance(ds.features["label"], datasets.ClassLabel):  # ints stand for found[int]
        keep = [found.index(c) for c in keep]
    return ds.select(np.flatnonzero(np.isin(labels, np.asarray(keep))))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class ImageClassificationData(_SplitData):
    """Image classification batches ``{"image": [B, 3, S, S], "label": [B]}``.

    ``source``: ``"mnist5k"`` (packaged, 5,000 digits), an image folder (``<class>/<file>``, or
    ``train/<class>/...`` plus ``test/`` or ``validation/`` for a test split), or a CSV / parquet /
    JSON file whose ``image_column`` holds image paths (relative to the file) or images.
    ``test_source`` (same kinds) gives a separate test split; else testing uses validation.
    ``classes``: keep only the rows with these original labels (e.g. ``[5, 6, 7, 8, 9]``, or
    folder names), every split; class ``i`` is then ``classes[i]``. ``None`` keeps every class.
    ``timm_model``: normalize with that timm model's pretrained ``mean`` / ``std`` (and resize
    with its interpolation) instead of ImageNet's; ``mean`` / ``std`` given here override it.
    Images are always squashed whole to ``image_size`` (see :func:`image_data_config`).
    """

    def __init__(self, source: str = "mnist5k", image_size: int = 64, batch_size: int = 64,
                 val_size: float | int = 0.2, train_limit: int | None = None,
                 val_limit: int | None = None, num_workers: int = 0, seed: int = 0,
                 image_column: str = "image", label_column: str = "label",
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None,
                 test_source: str | None = None, classes: list[int | str] | None = None,
                 timm_model: str | None = None) -> None:
        super().__init__(source, batch_size, val_size, train_limit, val_limit, test_source,
                         num_workers, seed, classes)
        _require(image_size >= 1, f"image_size={image_size} must be a positive number of pixels")
        for name, value in (("mean", mean), ("std", std)):
            _require(value is None or len(value) == 3,
                     f"{name}={value!r} must give 3 values (R, G, B), or None for the model's")
        _require(std is None or min(std) > 0, f"std={std!r} must be > 0 in every channel")
        self.save_hyperparameters()
        self.image_size, self.image_column = image_size, image_column
        self.label_column = label_column
        self.data_config = image_data_config(
            image_size, timm_model, None if mean is None else tuple(mean),
            None if std is None else tuple(std))
        self.mean, self.std = self.data_config["mean"], self.data_config["std"]  # as resolved

    def _read(self, source: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        path, test = Path(source).expanduser(), None
        if source == "mnist5k":
            ds = load_mnist5k()
        elif path.is_dir():
            found = datasets.load_dataset("imagefolder", data_dir=str(path))
            ds, test = found["train"], found.get("test", found.get("validation"))
        elif path.is_file():
            ds = read_table(path)
            check_columns(ds, source, image_column=self.image_column)
            ds = _image_paths(ds, self.image_column, path.parent)
        else:
            raise _unknown_source(source, "mnist5k")
        columns = {"image_column": self.image_column, "label_column": self.label_column}
        test = None if test is None else _rename(test, source, **columns)
        return _rename(ds, source, **columns), test

    def _finish(self, ds: datasets.Dataset) -> datasets.Dataset:
        if isinstance(ds.features["image"], datasets.Array2D | datasets.Array3D):
            return ds.with_format("numpy")  # arrays without Python lists
        return ds

    @functools.cached_property
    def collate(self) -> ImageCollate:
        return ImageCollate(self.data_config, self.label_index)


class TextClassificationData(_SplitData):
    """Text classification batches ``{"input_ids", "attention_mask", "label", "text"}``.

    ``source``: ``"rotten_tomatoes"`` (packaged: fresh=1 / rotten=0, 12,808 snippets) or a
    CSV / parquet / JSON file with ``text_column`` and ``label_column``. ``tokenizer``:
    ``"minilm"`` / ``"mpnet"`` or a Hugging Face folder; texts are truncated to ``max_length``.
    ``classes``: keep only the rows with these original labels, as for images.
    """

    def __init__(self, source: str = "rotten_tomatoes", tokenizer: str = "minilm",
                 max_length: int = 64, batch_size: int = 32, val_size: float | int = 0.2,
                 train_limit: int | None = None, val_limit: int | None = None,
                 num_workers: int = 0, seed: int = 0, text_column: str = "text",
                 label_column: str = "label", test_source: str | None = None,
                 classes: list[int | str] | None = None) -> None:
        super().__init__(source, batch_size, val_size, train_limit, val_limit, test_source,
                         num_workers, seed, classes)
        _require(max_length >= 2, f"max_length={max_length} must be >= 2 (special tokens)")
        self.save_hyperparameters()
        self.tokenizer_name, self.max_length = tokenizer, max_length
        self.text_column, self.label_column = text_column, label_column

    def _read(self, source: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        if source == "rotten_tomatoes":
            ds = load_rotten_tomatoes()
        elif Path(source).expanduser().is_file():
            ds = _rename(read_table(source), source, text_column=self.text_column,
                         label_column=self.label_column)
        else:
            raise _unknown_source(source, "rotten_tomatoes")
        empty = sum(text is None for text in ds["text"])
        if empty:
            warnings.warn(f"dropping {empty} rows of {source!r} without text", stacklevel=2)
            ds = ds.filter(lambda b: [t is not None for t in b["text"]], batched=True,
                           keep_in_memory=True)
        return ds, None

    @functools.cached_property
    def tokenizer(self) -> Any:
        from warmstart.lightning.models import tokenizer_for

        tokenizer = tokenizer_for(self.tokenizer_name)
        if tokenizer is None:
            raise ValueError(f"tokenizer={self.tokenizer_name!r} is a vision backbone; pass "
                             "'minilm', 'mpnet' or a Hugging Face model folder with a tokenizer")
        return tokenizer

    def _finish(self, ds: datasets.Dataset) -> datasets.Dataset:
        tokenizer, index = self.tokenizer, self.label_index

        def encode(batch: dict[str, list]) -> dict[str, list]:
            tokens = tokenizer(batch["text"], truncation=True, max_length=self.max_length,
                               return_token_type_ids=False, return_attention_mask=False)
            return {"input_ids": tokens["input_ids"], "label": [index[v] for v in batch["label"]]}

        stamp = Hasher.hash((ds._fingerprint, tokenizer.name_or_path, len(tokenizer),
                             self.max_length, sorted(index.items(), key=str)))
        features = ds.features.copy()  # explicit: `map` would keep a string label column's type
        features["label"] = datasets.Value("int64")
        features["input_ids"] = datasets.Sequence(datasets.Value("int32"))
        return ds.map(encode, batched=True, keep_in_memory=True, new_fingerprint=stamp,
                      features=features)

    @functools.cached_property
    def collate(self) -> TextCollate:
        return TextCollate(self.tokenizer)
