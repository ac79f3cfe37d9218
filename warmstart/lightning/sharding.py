"""Transport into a target that Lightning's FSDP strategies shard.

``FSDPStrategy`` (FSDP1) keeps each wrapped unit's weights as one flat parameter, split across
the ranks; ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) keeps every weight as a DTensor
holding one shard. The engine needs whole tensors: its forward hooks observe activations of the
whole network, and the update is computed from, and written into, whole weights. So, under
these strategies, the callback copies the target network at ``setup``, before the strategy
shards it (in ``configure_model`` or in its own ``setup``); at ``on_fit_start`` every rank fills
that copy with the full weights gathered from the shards (torch's ``get_model_state_dict`` with
``full_state_dict=True``), the engine runs on the copy exactly as without sharding (each rank on
its own shard of the data, statistics all-reduced, so every rank computes the same update), and
the result is written back into the shards (``set_model_state_dict``). The write is in place, so
the optimizer keeps its parameters. The cost: one full copy of the network on every rank while
the transport runs (the copy taken at ``setup`` holds memory until then unless the network was
built on the meta device).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from .warm import find_target

SHARDING_STRATEGIES = (FSDPStrategy, ModelParallelStrategy)
# Name parts that FSDP1, activation checkpointing and torch.compile insert into module paths.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_WORKAROUND = ("Or run the transport before training (`warmstart transport ... --out FILE`, or "
               "warmstart.transport on the unsharded network) and load the result, or fit with "
               "strategy='ddp'.")


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _fsdp2_module() -> type | tuple:
    """FSDP2's module class (``fully_shard``), public in torch.distributed.fsdp since torch 2.6."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch: no FSDP2 module can exist here
        return ()
    return FSDPModule


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    wrappers = (FullyShardedDataParallel, _fsdp2_module())
    return any(isinstance(m, wrappers) for m in module.modules()) \
        or any(isinstance(p, DTensor) for p in module.parameters())


def _resharded(root: nn.Module) -> nn.Module:
    """``root`` with every FSDP2 module back in its shards: after a forward without backward
    (a validation) the root module keeps its gathered weights, which torch's state-dict
    functions then take for unsharded ones, and a write would not reach the shards."""
    for module in root.modules():
        if isinstance(module, _fsdp2_module()):
            module.reshard()
    return root


def _materialize(network: nn.Module, device: torch.device) -> None:
    """Storage for a copy taken on the meta device (``init_module(empty_init=True)``), with
    parameters shared between modules (tied embeddings) shared again afterwards."""
    if not any(t.is_meta for t in (*network.parameters(), *network.buffers())):
        return
    first: dict[int, str] = {}
    ties = []
    for name, param in network.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties.append((name, first[id(param)]))
        first.setdefault(id(param), name)
    network.to_empty(device=device)  # new parameter objects: ties are lost here
    for name, tied_to in ties:
        owner, _, attr = name.rpartition(".")
        setattr(network.get_submodule(owner), attr, network.get_parameter(tied_to))


@dataclass
class ShardedTarget:
    """A full, unsharded copy of the target network, and where its weights live in the sharded
    LightningModule (``prefix``: the target's state-dict prefix, e.g. ``"net."``)."""

    strategy: str
    prefix: str
    network: nn.Module
    original: dict[str, Tensor] | None = None  # the gathered weights, kept while trials write
    written: bool = False

    @classmethod
    def at_setup(cls, trainer: L.Trainer, pl_module: L.LightningModule,
                 target_attribute: str | None) -> ShardedTarget | None:
        """The copy, under ``FSDPStrategy``/``ModelParallelStrategy``; ``None`` otherwise."""
        if not isinstance(trainer.strategy, SHARDING_STRATEGIES):
            return None
        name = type(trainer.strategy).__name__
        try:
            target = find_target(pl_module, target_attribute)
        except AttributeError as err:
            raise AttributeError(
                f"TaskVectorTransport under {name}: {err} Under {name} the transport needs the "
                "target network at setup, to copy it whole before the strategy shards it "
                "(configure_model runs after setup); build the network in the LightningModule's "
                "__init__ (built under `trainer.init_module(empty_init=True)`, on the meta "
                f"device, it takes no memory until {name} materialises it). {_WORKAROUND}"
            ) from err
        if _is_sharded(target):
            raise ValueError(
                f"TaskVectorTransport under {name}: the target network "
                f"{type(target).__name__} is sharded already at setup, so no whole copy of it "
                "can be taken; shard it in configure_model (fully_shard) or let the strategy "
                f"wrap it. {_WORKAROUND}")
        path = next(n for n, m in pl_module.named_modules(remove_duplicate=False) if m is target)
        try:
            network = copy.deepcopy(target)
        except Exception as err:  # noqa: BLE001 (any failure to copy gets the same advice)
            raise TypeError(
                f"TaskVectorTransport under {name} copies the target network at setup, before "
                f"it is sharded, and {type(target).__name__} cannot be deep-copied ({err}); "
                f"set target_attribute to the network itself. {_WORKAROUND}") from err
        return cls(name, f"{path}." if path else "", network)

    def gather(self, trainer: L.Trainer,
               evaluate: Callable[[nn.Module], float] | None) -> tuple[nn.Module, Callable | None]:
        """The copy holding the sharded target's current full weights (a collective: every rank
        calls it), and ``evaluate`` made to score the shards after writing the copy into them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(_resharded(trainer.strategy.model),
                                     options=StateDictOptions(full_state_dict=True))
        full = {k[len(self.prefix):]: v for k, v in state.items() if k.startswith(self.prefix)}
        expected = set(self.network.state_dict())
        if set(full) != expected:
            raise RuntimeError(
                f"TaskVectorTransport under {self.strategy}: the sharded target's weights are "
                f"not those of the network copied at setup (missing {sorted(expected - set(full))}"
                f", unexpected {sorted(set(full) - expected)}); configure_model may shard the "
                f"network but must not replace its layers. {_WORKAROUND}")
        prefix, module = self.prefix, trainer.lightning_module
        buffers = {_clean(n)[len(prefix):]: b for n, b in module.named_buffers()
                   if _clean(n).startswith(prefix)}  # non-persistent ones too (not in `full`)
        _materialize(self.network, trainer.strategy.root_device)
        with torch.no_grad():
            for name, tensor in (*self.network.named_parameters(),
                                 *self.network.named_buffers()):
                self._fill(name, tensor, full.get(name, buffers.get(name)))
        self.original = full if evaluate is not None else None
        return self.network, None if evaluate is None else self._scoring(trainer, evaluate)

    def _fill(self, name: str, tensor: Tensor, value: Tensor | None) -> None:
        if value is None:
            if tensor.is_meta:
                raise RuntimeError(f"TaskVectorTransport under {self.strategy}: {name} of the "
                                   "network copied at setup is on the meta device and the "
                                   "sharded target has no value for it.")
            return
        value = value.detach()
        if tensor.shape != value.shape:
            raise RuntimeError(f"TaskVectorTransport under {self.strategy}: {name} has shape "
                               f"{tuple(value.shape)} in the sharded target but "
                               f"{tuple(tensor.shape)} in the network copied at setup.")
        if tensor.dtype != value.dtype or tensor.device != value.device:
            tensor.data = torch.empty_like(value)  # same object: tied weights stay tied
        tensor.copy_(value)

    def _scoring(self, trainer: L.Trainer,
                 evaluate: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
        def score(network: nn.Module) -> float:  # alpha='auto' validates the sharded module
            self.scatter(trainer)
            return evaluate(network)

        return score

    def scatter(self, trainer: L.Trainer) -> None:
        """Write the copy's weights into the shards, in place (a collective)."""
        self._load(trainer, self.network.state_dict())
        self.written = True

    def restore(self, trainer: L.Trainer) -> None:
        """After a failure: the shards get back the weights they had, if a trial wrote them."""
        if self.written and self.original is not None:
            self._load(trainer, self.original)

    def _load(self, trainer: L.Trainer, state: Mapping[str, Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {self.prefix + k: v for k, v in state.items()}  # a new dict: torch consumes it
        result = set_model_state_dict(_resharded(trainer.strategy.model), full,
                                      options=StateDictOptions(full_state_dict=True,
                                                               strict=False))
        if result.unexpected_keys:
            raise RuntimeError(f"TaskVectorTransport under {self.strategy}: the sharded module "
                               f"has no weights named {sorted(result.unexpected_keys)}.")
