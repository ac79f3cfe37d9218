"""Convergence report of warm-started and cold-start fine-tuning runs.

Runs and curves live in :mod:`warmstart.experiments.curves`, their measures in
:mod:`warmstart.experiments.summary` (with :mod:`~warmstart.experiments.measures` and
:mod:`~warmstart.experiments.verdict`); :func:`write_report` summarizes runs there and writes
the result as Markdown, self-contained HTML, PNG/SVG plots, CSV and JSON. The report opens with
the verdict, then the steps and seconds each arm takes to reach thresholds set on the reference
arm's curve, the metric at equal budgets, the legacy "steps to the reference's final value" table
and the settings, the curves, the transport section (time split, maps and per-layer update norms
of the transported runs; :mod:`~warmstart.experiments.transport_section`) and the config as
YAML. The pages themselves are rendered by :mod:`warmstart.experiments.page`.

Example::

    runs = load_runs({("cold", 0): "cold0.csv", ("theseus", 0): "theseus0.csv"})
    summary = write_report(runs, "out/report", title="MiniLM -> MPNet, rotten tomatoes")
    print(summary.verdict.text)
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from warmstart.experiments.curves import CURVE_COLUMNS, Run
from warmstart.experiments.measures import DEFAULT_BUDGETS, DEFAULT_FRACTIONS, Mode, Stat
from warmstart.experiments.page import (
    Bullets,
    Heading,
    Image,
    Paragraph,
    Section,
    Table,
    TableData,
    html_page,
    markdown_page,
    write_images,
)
from warmstart.experiments.summary import Summary, summarize
from warmstart.experiments.transport_section import (
    Transports,
    config_section,
    load_transports,
    transport_section,
)

__all__ = ["TableData", "budget_table", "console_tables", "print_summary", "reach_tables",
           "summary_table", "write_report"]


def _fmt(stat: Stat, spec: str, suffix: str = "") -> str:
    mean, total = stat.mean, len(stat.values)
    if mean is None:
        return "not reached"
    text = "∞" if math.isinf(mean) else f"{mean:{spec}}{suffix}"
    if stat.std is not None:
        text += f" ± {stat.std:{spec}}"
    return text if stat.n == total else f"{text} ({stat.n}/{total} reached)"


def _cell(stat: Stat, spec: str) -> str:
    """Compact cell: "mean ± std", "(k/n)" when only k of n seeds have a value, "never" if none."""
    if stat.mean is None:
        return "never"
    text = f"{stat.mean:{spec}}" + (f" ± {stat.std:{spec}}" if stat.std is not None else "")
    return text if stat.n == len(stat.values) else f"{text} ({stat.n}/{len(stat.values)})"


def summary_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per arm, all strings) of the legacy table: steps and seconds to the
    reference arm's final value and the speedups computed from them."""
    m = summary.metric
    header = ["arm", "seeds", f"{m} at step 0", f"final {m}", f"mean {m} (AUC)", "steps to target",
              "seconds to target", "speedup (steps)", "speedup (wall-clock)"]
    rows = [
        [a.arm, str(len(a.seeds)), _fmt(a.step0, ".4f"), _fmt(a.final, ".4f"), _fmt(a.auc, ".4f"),
         _fmt(a.steps_to_target, ".1f"), _fmt(a.seconds_to_target, ".1f"),
         _fmt(a.speedup_steps, ".2f", "x"), _fmt(a.speedup_seconds, ".2f", "x")]
        for a in summary.arms
    ]
    return header, rows


def reach_tables(summary: Summary) -> tuple[TableData, TableData]:
    """Steps, then seconds, to reach each threshold: one row per arm, one column per threshold."""
    rule = "≥" if summary.higher_is_better else "≤"
    header = ("arm", *(f"{t.name} ({t.value:.4g})" for t in summary.thresholds))

    def rows(kind: str) -> tuple[tuple[str, ...], ...]:
        return tuple((a.arm, *(_cell(getattr(a.reached(t.name), kind), ".1f")
                               for t in summary.thresholds)) for a in summary.arms)

    ref, m = summary.reference_arm, summary.metric
    return (TableData(f"Steps to reach {ref}'s thresholds ({m} {rule} value)", header,
                      rows("steps")),
            TableData("Seconds to reach them (wall-clock from fit start, transport included)",
                      header, rows("seconds")))


def budget_table(summary: Summary) -> TableData:
    """The metric at each budget and its AUC: one row per arm."""
    header = ("arm", *(f"step {b.step} ({b.name})" for b in summary.budgets), "AUC")
    rows = tuple((a.arm, *(_cell(a.budget(b.name).value, ".3f") for b in summary.budgets),
                  _cell(a.auc, ".3f")) for a in summary.arms)
    return TableData(f"{summary.metric} at equal budgets", header, rows)


def _legacy_table(summary: Summary) -> TableData:
    header, rows = summary_table(summary)
    title = f"Steps to {summary.reference_arm}'s final {summary.metric} (legacy speedups)"
    return TableData(title, tuple(header), tuple(tuple(r) for r in rows))


def _reach_note(summary: Summary) -> str:
    ref, m = summary.reference, summary.metric
    return (f"Thresholds are set on the mean `{m}` curve of `{ref.arm}` over its {ref.n_seeds} "
            f"seed(s), which goes from {ref.start:.4g} (step {ref.start_step:g}) to its best, "
            f"{ref.best:.4g} (step {ref.best_step:g}): \"p%\" is p% of the way from the one to "
            f"the other, \"final\" its mean final value {ref.final:.4g}. An arm reaches one at "
            "its first evaluation at or past it. Cells: mean ± std over the seeds that reached "
            "it, (k/n) when only k of n did, \"never\" when none did.")


def _budget_note(summary: Summary) -> str:
    total = summary.budgets[-1].step if summary.budgets else 0
    return (f"Value at the last evaluation at or before each step, out of {total} steps (the "
            "shortest run); AUC = mean metric over the step span; ± = std over seeds.")


def _settings(summary: Summary) -> list[str]:
    rule = ">=" if summary.higher_is_better else "<="
    ref, m = summary.reference_arm, summary.metric
    steps = _fmt(summary.reference_steps_to_final, ".1f")
    seconds = _fmt(summary.reference_seconds_to_final, ".1f")
    lines = [
        f"metric: `{m}` ({'higher' if summary.higher_is_better else 'lower'} is better)",
        (f"target: {summary.target:.4f} = final `{m}` of `{ref}`, mean over seeds; a run reaches"
         f" it at its first point with value {rule} target"),
        (f"`{ref}` reaches its own final value after {steps} steps and {seconds} s (speedup"
         " numerators); speedup = those / the arm's steps (seconds) to target, per seed"),
        "seconds include the transport; AUC = mean metric over the step span; ± = std over seeds",
    ]
    return lines


def _sections(summary: Summary, config: dict | None,
              transports: Mapping[str, dict], curves_png: bytes) -> list[Section]:
    """The report's sections in order: verdict, thresholds, budgets, legacy table and settings,
    curves, transport, config."""
    steps, seconds = reach_tables(summary)
    legacy = _legacy_table(summary)
    return [
        Section("verdict", None, (Paragraph(summary.verdict.text, "Verdict:", "verdict"),)),
        Section("thresholds", "Time to reach the reference's thresholds",
                (Paragraph(_reach_note(summary)), Table(steps), Table(seconds))),
        Section("budgets", "Metric at equal budgets",
                (Paragraph(_budget_note(summary)), Table(budget_table(summary)))),
        Section("legacy", legacy.title,
                (Table(legacy, level=0), Heading("Settings"), Bullets(tuple(_settings(summary))))),
        Section("curves", "Curves", (Image("convergence", "convergence.png", curves_png),)),
        transport_section(transports),
        config_section(config),
    ]


def console_tables(summary: Summary) -> list[TableData]:
    """The tables :func:`print_summary` prints, each narrow enough for an 80-column terminal: the
    legacy table is split in two."""
    legacy = _legacy_table(summary)
    left, right = (0, 1, 2, 3, 4), (0, 5, 6, 7, 8)

    def part(cols: tuple[int, ...], title: str) -> TableData:
        return TableData(title, tuple(legacy.header[i] for i in cols),
                         tuple(tuple(r[i] for i in cols) for r in legacy.rows))

    return [*reach_tables(summary), budget_table(summary),
            part(left, f"{summary.metric} at step 0, final and AUC"), part(right, legacy.title)]


def print_summary(summary: Summary, title: str = "", console: Any = None) -> None:
    """Print the verdict and :func:`console_tables` with rich (to ``console`` when given, else a
    new ``Console``). Cells wrap, and fold rather than truncate, so no number is cut."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    if title:
        console.print(Text(title, style="bold"))
    if summary.verdict is not None:
        console.print(Text(f"Verdict: {summary.verdict.text}"))
    for data in console_tables(summary):
        table = Table(title=data.title)
        for name in data.header:
            table.add_column(name, overflow="fold")
        for row in data.rows:
            table.add_row(*row)
        console.print(table)


def write_report(
    runs: Sequence[Run],
    out_dir: str | Path,
    *,
    title: str,
    metric: str = "val_acc",
    loss_metric: str | None = "val_loss",
    higher_is_better: bool | None = None,
    reference_arm: str = "cold",
    config: dict | None = None,
    overwrite: bool = False,
    console: Any = None,
    mode: Mode = "auto",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    verdict_fraction: float = 0.9,
    transports: Transports | None = None,
) -> Summary:
    """Summarize ``runs`` (:func:`summarize`, which documents ``higher_is_better``, ``mode``,
    ``fractions``, ``budgets`` and ``verdict_fraction``) and write into ``out_dir``:
    ``report.md``, ``report.html`` (self-contained, plots embedded), ``convergence.png`` / ``.svg``
    (:func:`warmstart.experiments.plots.plot_convergence`), ``transport_norms.png`` (when
    ``transports`` are given), ``curves.csv`` (all runs, with ``arm`` and ``seed`` columns) and
    ``summary.json`` (``Summary.to_dict()``: ``verdict``,
    ``thresholds``, ``budgets``, ``reference`` and the per-arm measures); print the verdict and
    tables to ``console``. ``summary.json`` is written last, so a directory holding it holds a
    complete report, and it is not overwritten unless ``overwrite=True`` (``FileExistsError``).

    Both pages hold, in order: the verdict, the thresholds tables (then budgets and the legacy
    table), the curves, the transport section (time split, maps, per-layer update norms of each
    report in ``transports``: run name -> :class:`~warmstart.TransportReport`, its ``to_dict()``
    or its JSON path, or a list of JSON paths; see
    :func:`~warmstart.experiments.transport_section.load_transports`) and ``config`` as YAML.
    """
    out = Path(out_dir)
    reports = load_transports(transports)
    if (out / "summary.json").exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a report (summary.json); pass overwrite=True to replace it or "
            "choose another out_dir."
        )
    summary = summarize(runs, metric=metric, higher_is_better=higher_is_better,
                        reference_arm=reference_arm, extra={"title": title, "config": config or {}},
                        mode=mode, fractions=fractions, budgets=budgets,
                        verdict_fraction=verdict_fraction)
    out.mkdir(parents=True, exist_ok=True)
    frames = [r.curve.assign(arm=r.arm, seed=r.seed) for r in runs]
    curves = pd.concat(frames, ignore_index=True)[["arm", "seed", *CURVE_COLUMNS]]
    curves.to_csv(out / "curves.csv", index=False)
    png = _write_plots(runs, summary, out, metric, loss_metric, title)
    sections = _sections(summary, config, reports, png)
    write_images(sections, out)
    (out / "report.md").write_text(markdown_page(title, sections), encoding="utf-8")
    (out / "report.html").write_text(html_page(title, sections), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n",
                                      encoding="utf-8")
    print_summary(summary, title, console)
    return summary


def _write_plots(runs: Sequence[Run], summary: Summary, out: Path, metric: str,
                 loss_metric: str | None, title: str) -> bytes:
    """Write ``convergence.svg`` with the target and the verdict's threshold lines; return the
    PNG bytes (:func:`write_images` writes ``convergence.png``)."""
    from warmstart.experiments.plots import plot_convergence

    key = summary.verdict.threshold
    line = [(f"{key} of {summary.reference_arm}'s gain",
             next(t.value for t in summary.thresholds if t.name == key))]
    fig = plot_convergence(runs, metric=metric, loss_metric=loss_metric, target=summary.target,
                           thresholds=line, title=title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    fig.savefig(out / "convergence.svg", format="svg")
    return png.getvalue()
