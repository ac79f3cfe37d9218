"""The report's transport section and config section.

Transport: for each transported run, the time split of its transport (statistics, maps, rules,
apply, total seconds), its maps (grouped by width, then every map in a collapsible table) and a
plot of per-layer update norms. Config: the run settings as readable YAML.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from warmstart.experiments.page import (
    Details,
    Heading,
    Image,
    Paragraph,
    Preformatted,
    Section,
    Table,
    TableData,
)

TransportInput = Union[Any, Mapping[str, Any], str, os.PathLike]  # noqa: UP007
Transports = Union[Mapping[str, TransportInput], Sequence[Union[str, os.PathLike]]]  # noqa: UP007
PHASES = ("statistics", "maps", "rules", "apply")
NORMS_FILE = "transport_norms.png"


def _run_name(path: Path) -> str:
    """``runs/theseus_seed0/transport_report.json`` -> ``theseus seed 0``."""
    match = re.fullmatch(r"(.+)_seed(\d+)", path.parent.name)
    return f"{match[1]} seed {match[2]}" if match else path.parent.name or str(path)


def load_transports(transports: Transports | None) -> dict[str, dict]:
    """Transport reports as ``TransportReport.to_dict()`` dicts keyed by run name.

    ``transports`` maps run names to a :class:`~warmstart.TransportReport`, its ``to_dict()``
    or the path of its JSON; or lists JSON paths, named after their directory
    (``theseus_seed0`` -> ``theseus seed 0``).
    """
    if not transports:
        return {}
    if not isinstance(transports, Mapping):
        transports = {_run_name(Path(p)): p for p in transports}
    out = {}
    for name, report in transports.items():
        if isinstance(report, (str, os.PathLike)):
            path = Path(report)
            if not path.exists():
                raise FileNotFoundError(f"transport report {path} (run {name!r}) does not exist.")
            report = json.loads(path.read_text(encoding="utf-8"))
        elif hasattr(report, "to_dict"):
            report = report.to_dict()
        out[str(name)] = dict(report)
    return out


def _seconds(value: Any) -> str:
    if value is None:
        return ""
    return "< 0.001" if 0 < float(value) < 0.0005 else f"{float(value):.3f}"


def time_table(reports: Mapping[str, dict]) -> TableData:
    header = ("run", "method", "α", *PHASES, "other", "total")
    rows = []
    for name, r in reports.items():
        t = r.get("timings") or {}
        total = t.get("total")
        other = total - sum(t.get(k, 0.0) for k in PHASES) if total is not None else None
        rows.append((name, str(r.get("method", "")), f"{r.get('alpha', '')}",
                     *(_seconds(t.get(k)) for k in PHASES), _seconds(other), _seconds(total)))
    return TableData("Time split (seconds)", header, tuple(rows))


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def _determined(m: Mapping[str, Any]) -> bool:
    if "determined" in m:
        return bool(m["determined"])
    return m["rank"] + m.get("completed", 0) >= min(m["d_source"], m["d_target"])


def width_table(reports: Mapping[str, dict]) -> TableData:
    """Maps grouped by width, one row per run and width."""
    header = ("run", "d_source × d_target", "maps", "rank", "rows", "residual mean / max",
              "determined")
    rows = []
    for name, r in reports.items():
        groups: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
        for m in r.get("maps", ()):
            groups.setdefault((m["d_source"], m["d_target"]), []).append(m)
        if not groups:
            rows.append((name, "no maps", "0", "", "", "", ""))
        for (d_s, d_t), maps in groups.items():
            res = [float(m["residual"]) for m in maps]
            rows.append((name, f"{d_s} × {d_t}", str(len(maps)), _span([m["rank"] for m in maps]),
                         _span([m["n_rows"] for m in maps]),
                         f"{sum(res) / len(res):.3g} / {max(res):.3g}",
                         f"{sum(map(_determined, maps))}/{len(maps)}"))
    return TableData("Maps by width", header, tuple(rows))


def map_table(name: str, report: Mapping[str, Any]) -> TableData:
    header = ("space (target ← source)", "d_source × d_target", "rank", "rows", "residual")
    rows = []
    for m in report.get("maps", ()):
        t, s = m["target_space"], m["source_space"]
        rows.append((t if t == s else f"{t} ← {s}", f"{m['d_source']} × {m['d_target']}",
                     str(m["rank"]) + ("" if _determined(m) else " (deficient)"),
                     str(m["n_rows"]), f"{float(m['residual']):.3g}"))
    return TableData(f"{name}: maps", header, tuple(rows))


def _norms_png(reports: Mapping[str, dict]) -> bytes:
    from warmstart.experiments.plots import plot_update_norms

    fig = plot_update_norms(dict(reports))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()


def transport_section(reports: Mapping[str, dict]) -> Section:
    if not reports:
        note = ("No transport report was given (only cold runs, or the runs' "
                "`transport_report.json` files were not found).")
        return Section("transport", "Transport", (Paragraph(note),))
    first = next(iter(reports.values()))
    details = tuple(
        Details(f"{name}: all {len(r.get('maps', ()))} maps, "
                f"{len(r.get('skipped', ()))} parameters skipped",
                (Table(map_table(name, r), level=0, scroll=True),), open=i == 0)
        for i, (name, r) in enumerate((n, r) for n, r in reports.items() if r.get("maps")))
    note = (f"Model families `{first.get('source_family')}` -> `{first.get('target_family')}`; "
            "\"other\" is the rest of the total (reading the checkpoint, describing and matching "
            "the models, choosing alpha). Residual: relative misfit of a map on the calibration "
            "rows; a map is determined when its rank (plus completed directions) reaches the "
            "smaller width.")
    plot_note = ("Per-layer norm of the transported update ||τ_B|| of each run (before scaling by "
                 "α; for the head, the new head weights) and of the source's task vector ||τ_A|| "
                 "that the rules read, over the target's layers in report order; a layer's norm is "
                 "the root sum of squares over its parameters.")
    return Section("transport", "Transport", (
        Paragraph(note), Table(time_table(reports)), Table(width_table(reports)), *details,
        Heading("Per-layer update norms"),
        Image("per-layer update norms", NORMS_FILE, _norms_png(reports)), Paragraph(plot_note)))


def config_section(config: Mapping[str, Any] | None) -> Section:
    if not config:
        return Section("config", "Config", (Paragraph("No config was given."),))
    plain = json.loads(json.dumps(config, default=str))  # tuples -> lists, paths -> str
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=100)
    return Section("config", "Config", (Preformatted(text, "yaml"),))
