"""``warmstart``: LightningCLI ``fit`` / ``validate`` / ``test`` / ``predict``, plus ``transport``,
``compare`` and ``demo``.

usage: warmstart {fit,validate,test,predict,transport,compare,demo} ...

  warmstart demo                                   the embedded default, end to end
  warmstart fit -c configs/demo_target.yaml -c callbacks/transport.yaml \\
                -c callbacks/convergence.yaml      fine-tune, warm-started, with curves
  warmstart fit --print_config -c configs/text_mpnet_target.yaml
  warmstart transport -c configs/demo_target.yaml -c callbacks/transport.yaml \\
                --out runs/lite2_warm.safetensors  transport only, no training
  warmstart compare -c configs/compare_demo.yaml   arms x seeds and the convergence report

`warmstart fit --help` lists every option (the transport's under --transport.*);
`warmstart transport --help`, `warmstart compare --help`, `warmstart demo --help` their own;
`demo`, `compare` and `transport` take --verbose to show third-party chatter they hide.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, AttributeError,
               KeyError)
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_VERBOSE = ("show what third-party libraries print (Lightning's tips and banners, known "
            "deprecation warnings, progress bars of the datasets library)")


def _compare_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="warmstart compare",
                                     description="Run arms x seeds and write the report.")
    parser.add_argument("-c", "--config", required=True, help="compare config (YAML)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing report in out_dir")
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE)
    parser.add_argument("overrides", nargs="*",
                        help="extra LightningCLI arguments for every run, e.g. "
                             "--trainer.max_steps=50")
    args, extra = parser.parse_known_args(argv)
    from .experiments.compare import CompareConfig, run_compare

    config = CompareConfig.from_yaml(args.config, [*args.overrides, *extra])
    with _quiet(args.verbose):
        run_compare(config, overwrite=args.overwrite)
    print(f"report written to {Path(config.out_dir) / 'report.html'}")


def _demo_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="warmstart demo",
        description="The embedded default: EfficientNet-Lite0 -> Lite2 on MNIST 5k, all arms.")
    parser.add_argument("--out_dir", default="runs/demo")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE)
    args = parser.parse_args(argv)
    from .experiments.compare import run_demo

    with _quiet(args.verbose):
        run_demo(args.out_dir, overwrite=args.overwrite)


def _transport_command(argv: list[str]) -> None:
    from .lightning.cli import transport_command

    verbose = "--verbose" in argv
    with _quiet(verbose):
        transport_command([a for a in argv if a != "--verbose"])


def _quiet(verbose: bool):
    from .lightning.console import quiet_console

    return quiet_console(verbose)


def _lightning_command(argv: list[str], from_command_line: bool) -> None:
    from .lightning.cli import WarmstartCLI

    # from the console script LightningCLI reads sys.argv itself (given both, it warns)
    WarmstartCLI(args=None if from_command_line else argv)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    handlers = {"transport": _transport_command, "compare": _compare_command,
                "demo": _demo_command}
    try:
        if command in handlers:
            handlers[command](argv[1:])
        elif command in LIGHTNING_COMMANDS:
            _lightning_command(argv, from_command_line)
        else:
            print(__doc__)
            return 0 if command in ("-h", "--help", None) else 2
    except USER_ERRORS as err:
        print(f"warmstart: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
