"""``warmstart``: LightningCLI ``fit`` / ``validate`` / ``test``, plus ``transport``, ``compare``
and ``demo``.

    warmstart fit -c configs/text_minilm_to_mpnet.yaml -c callbacks/transport.yaml
    warmstart fit --print_config -c configs/demo_target.yaml
    warmstart transport --source_pretrained minilm --source_finetuned src.ckpt \\
        --target mpnet --num_classes 2 --data rotten_tomatoes --out target.ckpt
    warmstart compare -c configs/compare_demo.yaml
    warmstart demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, AttributeError, KeyError)
EXTRA_COMMANDS = ("transport", "compare", "demo")


def _lightning_cli():
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class WarmstartCLI(LightningCLI):
        """LightningCLI over any LightningModule / LightningDataModule (class_path/init_args)."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("subclass_mode_data", True)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            # Optional top-level sections, so `-c callbacks/transport.yaml` and
            # `-c callbacks/convergence.yaml` compose instead of replacing trainer.callbacks.
            from .callbacks import ConvergenceTracker, TaskVectorTransport

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

    return WarmstartCLI


def __getattr__(name: str):
    if name == "WarmstartCLI":
        return _lightning_cli()
    raise AttributeError(name)


def _transport_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="warmstart transport",
        description="Write a transported target checkpoint (and its report) without training.")
    parser.add_argument("--source_pretrained", required=True)
    parser.add_argument("--source_finetuned", required=True)
    parser.add_argument("--target", required=True, help="target backbone (name or folder)")
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--data", default=None,
                        help="calibration data: 'mnist5k', 'rotten_tomatoes' or a file/folder")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--method", default="theseus", choices=["theseus", "slice", "head_only"])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--out", required=True, help="output checkpoint (.safetensors or .ckpt)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists already; pass --overwrite or choose another --out.")
    from safetensors.torch import save_file

    from .data import ImageClassificationData, TextClassificationData
    from .models import Classifier, tokenizer_for
    from .warm import TransportConfig, run_transport

    model = Classifier(args.target, args.num_classes)
    is_text = tokenizer_for(args.target) is not None
    if is_text:
        data = TextClassificationData(args.data or "rotten_tomatoes", tokenizer=args.target)
    else:
        data = ImageClassificationData(args.data or "mnist5k", image_size=args.image_size)
    data.setup("fit")
    config = TransportConfig(args.source_pretrained, args.source_finetuned, args.method,
                             args.calibration_batches, args.alpha)
    config.check()
    report = run_transport(config, model, data.train_dataloader(), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, str(out))
    path = report.write_json(out.with_suffix(".report.json"), overwrite=args.overwrite)
    print(f"transported target written to {out}; report: {path}")


def _compare_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="warmstart compare",
                                     description="Run arms x seeds and write the report.")
    parser.add_argument("-c", "--config", required=True, help="compare config (YAML)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing report in out_dir")
    parser.add_argument("overrides", nargs="*",
                        help="extra LightningCLI arguments for every run, e.g. "
                             "--trainer.max_steps=50")
    args, extra = parser.parse_known_args(argv)
    from ..experiments.compare import CompareConfig, run_compare

    config = CompareConfig.from_yaml(args.config, [*args.overrides, *extra])
    run_compare(config, overwrite=args.overwrite)
    print(f"report written to {Path(config.out_dir) / 'report.html'}")


def _demo_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="warmstart demo",
        description="The embedded default: EfficientNet-Lite0 -> Lite2 on MNIST 5k, all arms.")
    parser.add_argument("--out_dir", default="runs/demo")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from ..experiments.compare import CompareConfig, run_compare

    config_path = Path(__file__).parent / "configs" / "demo.yaml"
    config = CompareConfig.from_yaml(config_path)
    config = CompareConfig(**{**config.__dict__, "out_dir": args.out_dir,
                              "source": {**config.source,
                                         "checkpoint": str(Path(args.out_dir) / "source.ckpt")}})
    run_compare(config, overwrite=True if args.overwrite else False)
    print(f"demo report: {Path(args.out_dir) / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command in EXTRA_COMMANDS:
            handler = {"transport": _transport_command, "compare": _compare_command,
                       "demo": _demo_command}[command]
            handler(argv[1:])
        else:
            if command in ("-h", "--help", None):
                print(__doc__)
            # from the console script LightningCLI reads sys.argv itself (given both, it warns)
            _lightning_cli()(args=None if from_command_line else argv)
    except USER_ERRORS as err:
        print(f"warmstart: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
