"""Checkpoint loading (every format, every error message) and task vectors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from warmstart.engine.task_vector import as_state_dict, load_state_dict, task_vector


class Opaque:
    """A pickled object that ``torch.load(weights_only=True)`` must refuse."""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("name", "wrap"),
    [
        ("raw.pt", lambda sd: sd),
        ("wrapped.pth", lambda sd: {"state_dict": sd, "epoch": 3}),
        ("model.bin", lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}),
    ],
)
def test_torch_files_round_trip(tmp_path, name, wrap):
    state = _net().state_dict()
    torch.save(wrap(state), tmp_path / name)
    _same(load_state_dict(tmp_path / name), state)


def test_safetensors_round_trip(tmp_path):
    state = {k: v.contiguous() for k, v in _net().state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    _same(load_state_dict(str(tmp_path / "w.safetensors")), state)


def test_lightning_checkpoint_with_prefix(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _net()

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), 4)
    module = Module()
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    _same(load_state_dict(tmp_path / "last.ckpt", prefix="model."), module.model.state_dict())
    _same(load_state_dict(tmp_path / "last.ckpt", prefix="model"), module.model.state_dict())


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    return BertModel(config)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_hugging_face_folder(tmp_path, shard):
    bert = _tiny_bert()
    bert.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    _same(load_state_dict(tmp_path), bert.state_dict())


def test_hugging_face_folder_with_pytorch_bin(tmp_path):
    bert = _tiny_bert()
    torch.save(bert.state_dict(), tmp_path / "pytorch_model.bin")
    _same(load_state_dict(tmp_path), bert.state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt does not exist; pass the path"):
        load_state_dict(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.pt", "bad.ckpt"])
def test_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(
        ValueError, match=r"could not read checkpoint .*bad.*expected a safetensors"
    ):
        load_state_dict(tmp_path / name)


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": _net().state_dict(), "extra": Opaque()}, tmp_path / "x.ckpt")
    with pytest.raises(
        ValueError, match=r"x\.ckpt: Unsupported global: .*Opaque .*weights_only=False\) yourself"
    ):
        load_state_dict(tmp_path / "x.ckpt")


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt holds a list, not a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"empty\.pt holds an empty dict"):
        load_state_dict(tmp_path / "empty.pt")
    torch.save({"epoch": 3, "w": torch.ones(2)}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"entries 'epoch' \(1 in all\) are not tensors"):
        load_state_dict(tmp_path / "mixed.pt")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has none of model\.safetensors.*found: config"):
        load_state_dict(tmp_path)


def test_index_errors(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(ValueError, match="could not read checkpoint index .*'weight_map'"):
        load_state_dict(tmp_path)
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"shard .*00001-of-00002.* copy the whole"):
        load_state_dict(tmp_path)


def test_prefix_that_matches_nothing(tmp_path):
    torch.save({"model.w": torch.ones(1), "head.b": torch.ones(1)}, tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"prefix='net\.' matches no key .*head\., model\."):
        load_state_dict(tmp_path / "p.pt", prefix="net.")


# --------------------------------------------------------------------------- as_state_dict


def test_as_state_dict_of_module_is_a_detached_clone():
    net = _net()
    state = as_state_dict(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(state["0.weight"], net[0].weight)
    assert not state["0.weight"].requires_grad


def test_as_state_dict_errors():
    with pytest.raises(TypeError, match="cannot read weights from a int; pass an nn.Module"):
        as_state_dict(3)
    with pytest.raises(TypeError, match=r"entries 'n' \(1 in all\) are not tensors"):
        as_state_dict({"n": 3, "w": torch.ones(1)})


# --------------------------------------------------------------------------- task vectors


def test_task_vector_values_and_dropped_integer_buffers():
    base, tuned = _net(), _net()
    with torch.no_grad():
        tuned[0].weight.add_(0.5)
        tuned[1].running_mean.add_(2.0)
    tuned[1].num_batches_tracked += 7
    vector = task_vector(base, tuned)
    assert "1.num_batches_tracked" not in vector
    assert set(vector) == {k for k in base.state_dict() if "num_batches" not in k}
    assert torch.allclose(vector["0.weight"], torch.full((3, 4), 0.5))
    assert torch.allclose(vector["1.running_mean"], torch.full((3,), 2.0))
    assert torch.equal(vector["0.bias"], torch.zeros(3))


def test_task_vector_from_paths_and_mixed_sources(tmp_path):
    base, tuned = _net(), _net()
    with torch.no_grad():
        tuned[0].bias.sub_(1.0)
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "tuned.ckpt")
    vector = task_vector(base.state_dict(), str(tmp_path / "tuned.ckpt"))
    assert torch.allclose(vector["0.bias"], -torch.ones(3))


def test_task_vector_dtypes():
    base = {"w": torch.ones(2, dtype=torch.bfloat16), "d": torch.ones(2, dtype=torch.float64)}
    tuned = {"w": torch.full((2,), 1.5, dtype=torch.float16), "d": torch.zeros(2)}
    vector = task_vector(base, tuned)
    assert vector["w"].dtype == torch.float32 and vector["d"].dtype == torch.float64
    assert torch.equal(vector["w"], torch.full((2,), 0.5)) and vector["d"].device.type == "cpu"


def test_task_vector_ignore_skips_both_sides():
    base = {"w": torch.zeros(2), "head": torch.zeros(10, 2)}
    tuned = {"w": torch.ones(2), "head": torch.zeros(3, 2), "extra": torch.ones(1)}
    vector = task_vector(base, tuned, ignore=["head", "extra"])
    assert list(vector) == ["w"]


def test_task_vector_key_mismatch():
    base = {f"k{i:02d}": torch.zeros(1) for i in range(13)}
    with pytest.raises(ValueError, match=r"only in pretrained: 'k00', .*, \.\.\. \(13 in all\)"):
        task_vector(base, {"other": torch.zeros(1)})


def test_task_vector_key_mismatch_names_the_wrapper_prefix():
    base = {"0.weight": torch.zeros(1), "1.bias": torch.zeros(1)}
    tuned = {"model.0.weight": torch.ones(1), "model.1.bias": torch.ones(1)}
    with pytest.raises(ValueError, match=r"finetuned keys all start with 'model\.': pass prefix="):
        task_vector(base, tuned)


def test_task_vector_shape_mismatch():
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    tuned = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    with pytest.raises(
        ValueError, match=r"differ for 1 keys \('a': \[2, 3\] vs \[3, 2\]; .*ignore="
    ):
        task_vector(base, tuned)


def test_task_vector_ignore_accepts_one_name():
    base = {"w": torch.zeros(2), "head": torch.zeros(10, 2)}
    tuned = {"w": torch.ones(2), "head": torch.zeros(3, 2)}
    assert list(task_vector(base, tuned, ignore="head")) == ["w"]


def test_task_vector_does_not_alias_the_finetuned_module():
    base, tuned = _net(), _net()
    vector = task_vector(base, tuned)
    with torch.no_grad():
        tuned[0].weight.add_(1.0)
    assert torch.equal(vector["0.weight"], torch.zeros(3, 4))


def test_lazy_task_vector_matches_the_eager_one_and_holds_no_copy():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    tuned = {k: v + 0.5 if v.is_floating_point() else v for k, v in base.state_dict().items()}
    eager = task_vector(base, tuned)
    lazy = task_vector(base, tuned, lazy=True)
    assert set(lazy) == set(eager) and len(lazy) == len(eager)
    assert "1.num_batches_tracked" not in lazy  # integer buffers are not weights
    for key, value in eager.items():
        assert value.dtype == torch.float32 and torch.equal(lazy[key], value)
    # computed when read, from the live tensors: nothing of the difference is stored
    tuned["0.weight"].add_(1.0)
    assert torch.equal(lazy["0.weight"], eager["0.weight"] + 1.0)
