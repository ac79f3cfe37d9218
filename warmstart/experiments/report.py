"""Convergence report of warm-started and cold-start fine-tuning runs.

Runs, curves and their measures live in :mod:`warmstart.experiments.summary`; :func:`write_report` summarizes
runs there and writes the result as Markdown, self-contained HTML, PNG/SVG plots, CSV and JSON.

Example::

    runs = load_runs({("cold", 0): "cold0.csv", ("theseus", 0): "theseus0.csv"})
    summary = write_report(runs, "out/report", title="MiniLM -> MPNet, rotten tomatoes")
    print(summary.arm("theseus").speedup_steps.mean)
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from warmstart.experiments.summary import CURVE_COLUMNS, Run, Stat, Summary, summarize


def _fmt(stat: Stat, spec: str, suffix: str = "") -> str:
    mean, total = stat.mean, len(stat.values)
    if mean is None:
        return "not reached"
    text = "∞" if math.isinf(mean) else f"{mean:{spec}}{suffix}"
    if stat.std is not None:
        text += f" ± {stat.std:{spec}}"
    return text if stat.n == total else f"{text} ({stat.n}/{total} reached)"


def summary_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per arm, all strings) shared by the Markdown, HTML and console
    tables."""
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


def _settings(summary: Summary, config: dict | None) -> list[str]:
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
    if config:
        lines.append(f"config: `{json.dumps(config, sort_keys=True, default=str)}`")
    return lines


def _markdown(title: str, summary: Summary, config: dict | None) -> str:
    header, rows = summary_table(summary)
    lines = [f"# {title}", "", "## Settings", ""] + [f"- {s}" for s in _settings(summary, config)]
    lines += ["", "## Summary", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + ["", "## Curves", "", "![convergence](convergence.png)", ""])


def _html(title: str, summary: Summary, config: dict | None, png: bytes) -> str:
    def cells(tag: str, row: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"

    header, rows = summary_table(summary)
    settings = (re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(s))
                for s in _settings(summary, config))
    items = "".join(f"<li>{s}</li>" for s in settings)
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}img{max-width:100%}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><h2>Settings</h2><ul>{items}</ul>"
        f"<h2>Summary</h2><table>{cells('th', header)}{''.join(cells('td', r) for r in rows)}"
        f"</table><h2>Curves</h2><img alt='convergence' src='data:image/png;base64,{data}'>"
        "</body></html>\n"
    )


def print_summary(summary: Summary, title: str = "", console: Any = None) -> None:
    """Print the summary table with rich (to ``console`` when given, else a new ``Console``)."""
    from rich.console import Console
    from rich.table import Table

    header, rows = summary_table(summary)
    table = Table(*header, title=title or None)
    table.columns[0].no_wrap = True
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)


def write_report(
    runs: Sequence[Run],
    out_dir: str | Path,
    *,
    title: str,
    metric: str = "val_acc",
    loss_metric: str | None = "val_loss",
    higher_is_better: bool = True,
    reference_arm: str = "cold",
    config: dict | None = None,
    overwrite: bool = False,
    console: Any = None,
) -> Summary:
    """Summarize ``runs`` (:func:`summarize`) and write into ``out_dir``: ``report.md``,
    ``report.html`` (self-contained, plot embedded), ``convergence.png`` / ``.svg``
    (:func:`warmstart.experiments.plots.plot_convergence`), ``curves.csv`` (all runs, with ``arm`` and ``seed``
    columns) and ``summary.json``; print the table to ``console``. ``summary.json`` is written last,
    so a directory holding it holds a complete report, and it is not overwritten unless
    ``overwrite=True`` (``FileExistsError``).
    """
    from warmstart.experiments.plots import plot_convergence

    out = Path(out_dir)
    if (out / "summary.json").exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a report (summary.json); pass overwrite=True to replace it or "
            "choose another out_dir."
        )
    extra = {"title": title, "config": config or {}}
    summary = summarize(runs, metric=metric, higher_is_better=higher_is_better,
                        reference_arm=reference_arm, extra=extra)
    out.mkdir(parents=True, exist_ok=True)
    frames = [r.curve.assign(arm=r.arm, seed=r.seed) for r in runs]
    curves = pd.concat(frames, ignore_index=True)[["arm", "seed", *CURVE_COLUMNS]]
    curves.to_csv(out / "curves.csv", index=False)
    fig = plot_convergence(runs, metric=metric, loss_metric=loss_metric, target=summary.target,
                           title=title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    (out / "convergence.png").write_bytes(png.getvalue())
    fig.savefig(out / "convergence.svg", format="svg")
    (out / "report.md").write_text(_markdown(title, summary, config), encoding="utf-8")
    (out / "report.html").write_text(_html(title, summary, config, png.getvalue()),
                                     encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n",
                                      encoding="utf-8")
    print_summary(summary, title, console)
    return summary
