"""LightningCLI for warmstart, and the ``warmstart transport`` command built on it.

``WarmstartCLI`` is LightningCLI over any LightningModule and LightningDataModule
(``class_path`` / ``init_args``), with two optional top-level sections, ``transport`` and
``convergence``, so that the fragments in ``callbacks/`` compose with any fit config through ``-c``.

``warmstart transport`` reads the same configs: it runs ``fit`` for zero optimizer steps, so that
the :class:`~warmstart.TaskVectorTransport` callback warm-starts the model exactly as it would
at the start of training (same calibration data, same device, same ``alpha="auto"`` scoring by
the module's validation), then writes the target network's weights as safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .callbacks import ConvergenceTracker, TaskVectorTransport
from .warm import find_target


class WarmstartCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (class_path/init_args)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Optional top-level sections, so `-c callbacks/transport.yaml` and
        # `-c callbacks/convergence.yaml` compose instead of replacing trainer.callbacks.
        parser.add_argument("--transport", type=TaskVectorTransport | None, default=None,
                            help="warm-start the model at fit start (callbacks/transport.yaml)")
        parser.add_argument("--convergence", type=ConvergenceTracker | None, default=None,
                            help="record convergence curves (callbacks/convergence.yaml)")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        for key in ("transport", "convergence"):
            if config.get(key) is not None:
                trainer.callbacks.append(config[key])
        return trainer


def build_cli(args: list[str]) -> WarmstartCLI:
    """A ``WarmstartCLI`` for ``fit`` with ``args`` (config files and overrides), not run."""
    with warnings.catch_warnings():
        # Built from Python on purpose; the command line was already parsed.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return WarmstartCLI(args=args, run=False)


TRANSPORT_USAGE = """\
warmstart transport -c FIT_CONFIG -c callbacks/transport.yaml --out TARGET.safetensors
                    [--overwrite] [--verbose] [any fit option, e.g. --transport.options.alpha=2
                    --transport.options.solver=eigh --trainer.accelerator=cuda]

Warm-start the target of a fit config without training and write its weights (safetensors)
and the transport report (<out>.report.json). Every option of the transport callback
(--transport.*, its TransportOptions under --transport.options.*) and of the Trainer
(--trainer.*, e.g. the device: --trainer.accelerator) is available. The transport's options
are listed below; the Trainer's, the model's and the data's by `warmstart fit --help`.

With a LoRA adapter as --transport.source_finetuned, --adapter_out DIR writes a PEFT adapter of
the same rank for the target instead (the target is left as it is; DIR must be empty or new)."""


def transport_command(argv: list[str]) -> Path:
    """``warmstart transport``: the transported target's weights, written to ``--out``."""
    parser = argparse.ArgumentParser(prog="warmstart transport", usage=TRANSPORT_USAGE,
                                     add_help=False)
    parser.add_argument("--out", help="output weights of the target network (.safetensors)")
    parser.add_argument("--adapter_out", help="write a PEFT LoRA adapter for the target here "
                        "instead (the source must be a LoRA adapter)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        print(TRANSPORT_USAGE + "\n")
        build_cli(["--transport.help", "TaskVectorTransport"])  # LightningCLI's own help; exits
    if not args.out and not args.adapter_out:
        raise ValueError("warmstart transport needs --out TARGET.safetensors (see "
                         "warmstart transport --help).")
    out = Path(args.out or args.adapter_out)
    if args.adapter_out and args.out:
        raise ValueError("give --out (the transported target's weights) or --adapter_out (a "
                         "LoRA adapter for the target), not both.")
    busy = (out.is_file() or out.is_dir() and any(out.iterdir())) if args.adapter_out \
        else out.exists()  # an empty folder is fine for an adapter
    if busy and not args.overwrite:
        raise FileExistsError(f"{out} exists already; pass --overwrite or choose another --out.")
    cli = build_cli([*rest, "--trainer.max_steps=0", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0",
                     f"--trainer.default_root_dir={out.parent / (out.stem + '_run')}"])
    warm = next((c for c in cli.trainer.callbacks if isinstance(c, TaskVectorTransport)), None)
    if warm is None:
        raise ValueError("warmstart transport needs a transport section: add "
                         "-c callbacks/transport.yaml (or --transport.source_pretrained=... "
                         "--transport.source_finetuned=...).")
    if args.adapter_out:
        warm.plan = dataclasses.replace(warm.plan, adapter_out=str(out),
                                        adapter_overwrite=args.overwrite)
    cli.trainer.fit(cli.model, cli.datamodule)
    if args.adapter_out:
        print(f"LoRA adapter for the target written to {out} (report: {warm.report_path})")
        return out
    return write_target(cli.model, warm, out, args.overwrite)


def write_target(model: L.LightningModule, warm: TaskVectorTransport, out: Path,
                 overwrite: bool) -> Path:
    from safetensors.torch import save_file

    target = find_target(model, warm.plan.target_attribute)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in target.state_dict().items()},
              str(out))
    report = warm.report.write_json(out.with_suffix(".report.json"), overwrite=overwrite)
    print(f"transported target written to {out}; report: {report}")
    return out
