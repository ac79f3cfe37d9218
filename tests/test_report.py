"""Convergence report: exact measures on synthetic piecewise-linear curves, errors, written
files."""

from __future__ import annotations

import base64
import copy
import functools
import html
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from warmstart import TransportReport, transport
from warmstart.experiments.plots import (
    band_over_seeds,
    layer_norms,
    plot_convergence,
    plot_update_norms,
)
from warmstart.experiments.report import console_tables, print_summary, write_report
from warmstart.experiments.summary import Run, load_runs, read_curve, summarize

STEPS = np.arange(0, 201, 10)


def curve(knots_x, knots_y, *, transport_s=0.0, loss=True, sec_per_step=0.5) -> pd.DataFrame:
    """Accuracy sampled on STEPS from a piecewise-linear curve; loss = 1 - accuracy."""
    acc = np.interp(STEPS, knots_x, knots_y)
    seconds = transport_s + sec_per_step * STEPS
    rows = [("val_acc", acc)] + ([("val_loss", 1.0 - acc)] if loss else [])
    return pd.concat(
        [
            pd.DataFrame({"step": STEPS, "seconds": seconds, "metric": m, "value": v})
            for m, v in rows
        ],
        ignore_index=True,
    )


def make_runs(loss=True) -> list[Run]:
    """cold reaches 0.8 at step 100 and stays; theseus starts at 0.7 and reaches 0.8 at step 20
    (seed 0) or 30 (seed 1) after a 5 s transport; head_only (one seed) stays at 0.5."""
    return [
        Run("cold", 0, curve([0, 100, 200], [0.1, 0.8, 0.8], loss=loss)),
        Run("cold", 1, curve([0, 100, 200], [0.1, 0.8, 0.8], loss=loss)),
        Run("theseus", 0, curve([0, 20, 200], [0.7, 0.8, 0.9], transport_s=5, loss=loss)),
        Run("theseus", 1, curve([0, 30, 200], [0.7, 0.8, 0.9], transport_s=5, loss=loss)),
        Run("head_only", 0, curve([0, 200], [0.5, 0.5], transport_s=1, loss=loss)),
    ]


def test_summary_exact_numbers():
    s = summarize(make_runs())
    assert s.target == pytest.approx(0.8)
    assert [a.arm for a in s.arms] == ["cold", "theseus", "head_only"]
    assert s.reference_steps_to_final.values == (100.0, 100.0)
    assert s.reference_seconds_to_final.mean == pytest.approx(50.0)

    cold = s.arm("cold")
    assert cold.step0.mean == pytest.approx(0.1) and cold.step0.std == pytest.approx(0.0)
    assert cold.final.mean == pytest.approx(0.8)
    assert cold.steps_to_target.values == (100.0, 100.0)
    assert cold.speedup_steps.mean == pytest.approx(1.0)
    # (100 * (0.1 + 0.8) / 2 + 100 * 0.8) / 200
    assert cold.auc.mean == pytest.approx(0.625)

    th = s.arm("theseus")
    assert th.step0.mean == pytest.approx(0.7)
    assert th.final.mean == pytest.approx(0.9)
    assert th.steps_to_target.values == (20.0, 30.0)
    assert th.steps_to_target.mean == pytest.approx(25.0)
    assert th.steps_to_target.std == pytest.approx(math.sqrt(50.0))
    assert th.seconds_to_target.values == (15.0, 20.0)  # 5 s transport + 0.5 s/step
    assert th.speedup_steps.values == pytest.approx((5.0, 100 / 30))
    assert th.speedup_steps.mean == pytest.approx((5.0 + 100 / 30) / 2)
    assert th.speedup_seconds.values == pytest.approx((50 / 15, 2.5))
    assert th.n_reached == 2
    # seed 0: (20 * 0.75 + 180 * 0.85) / 200; seed 1: (30 * 0.75 + 170 * 0.85) / 200
    assert th.auc.values == pytest.approx((0.84, 0.835))


def test_never_reached_and_single_seed():
    s = summarize(make_runs())
    ho = s.arm("head_only")
    assert ho.steps_to_target.values == (None,) and ho.steps_to_target.mean is None
    assert ho.speedup_steps.mean is None and ho.speedup_seconds.mean is None
    assert ho.n_reached == 0
    assert ho.step0.mean == pytest.approx(0.5) and ho.step0.std is None  # one seed: no std
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["arms"]["head_only"]["steps_to_target"] == {
        "mean": None, "std": None, "n": 0, "values": [None]
    }


def test_partially_reached_is_counted():
    runs = make_runs() + [Run("theseus", 2, curve([0, 200], [0.6, 0.7], transport_s=5))]
    th = summarize(runs).arm("theseus")
    assert th.steps_to_target.values == (20.0, 30.0, None)
    assert th.steps_to_target.mean == pytest.approx(25.0) and th.n_reached == 2


def test_target_equal_to_mean_of_finals_is_reached():
    # mean of three 0.8 is 0.8000000000000002: without slack the cold runs would "never" reach it.
    runs = [Run("cold", i, curve([0, 100, 200], [0.1, 0.8, 0.8])) for i in range(3)]
    s = summarize(runs)
    assert s.target > 0.8
    assert s.arm("cold").steps_to_target.values == (100.0, 100.0, 100.0)


def test_reached_at_step_zero_is_infinite_speedup():
    runs = make_runs() + [Run("oracle", 0, curve([0, 200], [0.85, 0.9], transport_s=2))]
    s = summarize(runs)
    oracle = s.arm("oracle")
    assert oracle.steps_to_target.values == (0.0,)
    assert math.isinf(oracle.speedup_steps.mean)
    assert oracle.speedup_seconds.values == pytest.approx((25.0,))  # 50 s / 2 s transport
    assert s.to_dict()["arms"]["oracle"]["speedup_steps"]["mean"] == "inf"


def test_lower_is_better_on_loss():
    s = summarize(make_runs(), metric="val_loss", higher_is_better=False)
    assert s.target == pytest.approx(0.2)
    assert s.arm("theseus").steps_to_target.values == (20.0, 30.0)
    assert s.arm("head_only").steps_to_target.mean is None


def test_missing_reference_arm_names_arms_and_fix():
    runs = [r for r in make_runs() if r.arm != "cold"]
    with pytest.raises(ValueError, match=r"reference arm 'cold'.*\['head_only', 'theseus'\].*"
                                         r"reference_arm="):
        summarize(runs)
    assert summarize(runs, reference_arm="theseus").target == pytest.approx(0.9)


def test_other_input_errors():
    runs = make_runs()
    with pytest.raises(ValueError, match=r"run \('cold', 0\) is given twice"):
        summarize(runs + [runs[0]])
    with pytest.raises(ValueError, match=r"has no 'val_f1' points; its metrics are \['val_acc', "):
        summarize(runs, metric="val_f1")
    with pytest.raises(ValueError, match=r"lacks columns \['seconds'\]"):
        Run("cold", 0, pd.DataFrame({"step": [0], "metric": ["val_acc"], "value": [0.1]}))


def test_read_and_load_runs(tmp_path):
    frame = curve([0, 200], [0.2, 0.6])
    shuffled = pd.concat([frame.iloc[::-1], frame.iloc[[3]].assign(value=0.99)])
    shuffled.to_csv(tmp_path / "c.csv", index=False)
    got = read_curve(tmp_path / "c.csv")
    assert list(got.columns) == ["step", "seconds", "metric", "value"]
    acc = got[got.metric == "val_acc"]
    assert acc.step.is_monotonic_increasing and len(acc) == len(STEPS)
    assert acc.set_index("step").value[30] == 0.99  # a repeated step keeps its last row
    (runs,) = [load_runs({("cold", 3): tmp_path / "c.csv"})]
    assert runs[0].arm == "cold" and runs[0].seed == 3
    (tmp_path / "bad.csv").write_text("step,metric,value\n0,val_acc,0.1\n")
    with pytest.raises(ValueError, match=r"bad.csv lacks columns \['seconds'\]"):
        read_curve(tmp_path / "bad.csv")


def test_write_report_files_parse(tmp_path):
    out = tmp_path / "rep"
    buf = io.StringIO()
    s = write_report(make_runs(), out, title="toy: cold vs theseus", config={"lr": 1e-3},
                     console=Console(file=buf, width=250))
    names = {"report.md", "report.html", "convergence.png", "convergence.svg", "curves.csv",
             "summary.json"}
    assert names <= {p.name for p in out.iterdir()}

    data = json.loads((out / "summary.json").read_text())
    assert data == s.to_dict() and data["extra"]["config"] == {"lr": 1e-3}
    assert data["arms"]["theseus"]["steps_to_target"]["mean"] == pytest.approx(25.0)

    csv = pd.read_csv(out / "curves.csv")
    assert list(csv.columns) == ["arm", "seed", "step", "seconds", "metric", "value"]
    assert len(csv) == 5 * 2 * len(STEPS) and set(csv.arm) == {"cold", "theseus", "head_only"}

    img = mpimg.imread(out / "convergence.png")
    assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 700
    assert ET.parse(out / "convergence.svg").getroot().tag.endswith("svg")

    md = (out / "report.md").read_text()
    assert md.startswith("# toy: cold vs theseus")
    assert "| theseus | 2 | 0.7000 ± 0.0000 |" in md and "not reached" in md
    assert "25.0 ± 7.1" in md and "![convergence](convergence.png)" in md

    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "not reached" in page
    assert "src='http" not in page and "<link" not in page

    text = buf.getvalue()
    assert "theseus" in text and "not reached" in text and "4.17x" in text


def test_overwrite_protection(tmp_path):
    write_report(make_runs(), tmp_path, title="a", console=Console(file=io.StringIO()))
    with pytest.raises(FileExistsError, match=r"already holds a report.*overwrite=True.*out_dir"):
        write_report(make_runs(), tmp_path, title="b", console=Console(file=io.StringIO()))
    s = write_report(make_runs(), tmp_path, title="b", overwrite=True,
                     console=Console(file=io.StringIO()))
    assert json.loads((tmp_path / "summary.json").read_text())["extra"]["title"] == "b"
    assert s.extra["title"] == "b"


def test_missing_loss_panels_say_so(tmp_path):
    runs = make_runs(loss=False)
    fig = plot_convergence(runs, metric="val_acc", loss_metric="val_loss")
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes.count("no 'val_loss' in the curves") == 2
    write_report(runs, tmp_path, title="no loss", console=Console(file=io.StringIO()))
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_band_over_seeds_common_grid():
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 2.0]))
    b = (np.array([5.0, 15.0, 25.0]), np.array([1.0, 1.0, 1.0]))
    grid, mean, low, high = band_over_seeds([a, b])
    np.testing.assert_allclose(grid, [5.0, 10.0, 15.0, 20.0])
    np.testing.assert_allclose(low, [0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(high, [1.0, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(mean, (low + high) / 2)


def linear(y0, y1, *, transport_s=0.0) -> pd.DataFrame:
    """val_acc from y0 at step 0 to y1 at step 40, one evaluation a step, 0.5 s a step."""
    steps = np.arange(0, 41)
    return pd.DataFrame({"step": steps, "seconds": transport_s + 0.5 * steps,
                         "metric": "val_acc", "value": np.interp(steps, [0, 40], [y0, y1])})


def linear_runs() -> list[Run]:
    """cold 0.1 -> 0.9 (two seeds); theseus from 0.8, 0.7 and a flat 0.6 after a 3 s transport;
    an arm with a long name that never gets past 0.5."""
    return [Run("cold", 0, linear(0.1, 0.9)), Run("cold", 1, linear(0.1, 0.9)),
            Run("theseus", 0, linear(0.8, 1.0, transport_s=3)),
            Run("theseus", 1, linear(0.7, 1.0, transport_s=3)),
            Run("theseus", 2, linear(0.6, 0.6, transport_s=3)),
            Run("lora_theseus", 0, linear(0.3, 0.5, transport_s=1))]


def test_console_at_80_columns_cuts_no_number():
    summary = summarize(linear_runs())
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(summary, "a title long enough to wrap " * 4, console)
    text = console.export_text()
    lines = text.splitlines()
    assert "…" not in text
    assert max(len(line) for line in lines) <= 80
    # a table wider than the terminal is cropped at the edge without an ellipsis: every table
    # line must end with its right border
    for line in lines:
        if line[:1] in "┏┃┡│└":
            assert line.rstrip()[-1] in "┓┃┩│┘", line
    words = set(re.split(r"[\s│┃]+", text))
    tables = console_tables(summary)
    assert len(tables) == 5
    for table in tables:
        for row in table.rows:
            for cell in row[1:]:
                assert set(cell.split()) <= words, (table.title, cell)
    assert "10.0 ± 8.5 (2/3)" in " ".join(tables[0].rows[1])  # theseus, 90%
    assert "Verdict: theseus reached 90% of cold's gain" in text


def test_report_opens_with_the_verdict_then_thresholds_then_curves(tmp_path):
    out = tmp_path / "rep"
    s = write_report(linear_runs(), out, title="linear", console=Console(file=io.StringIO()))
    verdict = ("theseus reached 90% of cold's gain (val_acc ≥ 0.82) in 10 steps (2 of 3 seeds) "
               "(cold: 36), 3.6x fewer steps; counting wall-clock time from fit start, transport "
               "included (first evaluation at 3.0 s, cold's at 0.0 s), it got there in 8.0 s "
               "(cold: 18.0 s), 2.2x sooner.")
    assert s.verdict.text == verdict

    md = (out / "report.md").read_text()
    order = [f"**Verdict:** {verdict}", "## Time to reach the reference's thresholds",
             "### Steps to reach cold's thresholds (val_acc ≥ value)",
             "| arm | 50% (0.5) | 80% (0.74) | 90% (0.82) | 95% (0.86) | final (0.9) |",
             "| cold | 20.0 ± 0.0 | 32.0 ± 0.0 | 36.0 ± 0.0 | 38.0 ± 0.0 | 40.0 ± 0.0 |",
             "| theseus | 0.0 ± 0.0 | 3.0 ± 4.2 (2/3) | 10.0 ± 8.5 (2/3) | 17.0 ± 7.1 (2/3) |",
             "| lora_theseus | 40.0 | never | never | never | never |",
             "### Seconds to reach them", "| cold | 10.0 ± 0.0 | 16.0 ± 0.0 | 18.0 ± 0.0 |",
             "## Metric at equal budgets",
             "| arm | step 10 (25%) | step 20 (50%) | step 40 (100%) | AUC |",
             "| cold | 0.300 ± 0.000 | 0.500 ± 0.000 | 0.900 ± 0.000 | 0.500 ± 0.000 |",
             "## Steps to cold's final val_acc (legacy speedups)", "### Settings",
             "## Curves", "![convergence](convergence.png)", "## Transport",
             "No transport report was given", "## Config", "No config was given."]
    at = [md.find(piece) for piece in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at))
    assert md.startswith(f"# linear\n\n**Verdict:** {verdict}")

    page = (out / "report.html").read_text()
    order = ["<section id='verdict'>", html.escape(verdict), "<section id='thresholds'>",
             "Time to reach the reference", "<td>10.0 ± 8.5 (2/3)</td>",
             "<section id='budgets'>", "Metric at equal budgets", "<section id='legacy'>",
             "legacy speedups", "<h3>Settings</h3>", "<section id='curves'>",
             "data:image/png;base64,", "<section id='transport'>", "<section id='config'>"]
    at = [page.find(piece) for piece in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at))
    assert "src='http" not in page and "<link" not in page and "<script" not in page
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(png) == (out / "convergence.png").read_bytes()

    data = json.loads((out / "summary.json").read_text())
    assert data["verdict"]["text"] == verdict and data["verdict"]["arm"] == "theseus"
    assert [t["name"] for t in data["thresholds"]] == ["50%", "80%", "90%", "95%", "final"]
    assert data["thresholds"][2]["arms"]["theseus"]["steps"]["values"] == [4.0, 16.0, None]
    assert [b["step"] for b in data["budgets"]["points"]] == [10, 20, 40]


def test_report_on_a_loss_decides_the_direction_from_the_name(tmp_path):
    runs = [Run(r.arm, r.seed, r.curve.assign(value=1 - r.curve["value"], metric="val_loss"))
            for r in linear_runs()]
    s = write_report(runs, tmp_path, title="loss", metric="val_loss", loss_metric=None,
                     console=Console(file=io.StringIO()))
    assert s.mode == "min" and s.verdict.arm == "theseus"
    md = (tmp_path / "report.md").read_text()
    assert "(val_loss ≤ 0.18)" in md and "(val_loss ≤ value)" in md
    assert "metric: `val_loss` (lower is better)" in md


def test_compare_config_chooses_the_metric_and_its_direction(tmp_path, monkeypatch):
    from warmstart.experiments import compare

    path = tmp_path / "compare.yaml"
    path.write_text(f"fit_config: [a.yaml]\nout_dir: {tmp_path / 'out'}\ntransport: {{}}\n"
                    "arms: [cold, theseus]\nseeds: [0, 1]\nmetric: val_loss\n")
    config = compare.CompareConfig.from_yaml(path)
    assert (config.metric, config.mode) == ("val_loss", "auto")
    curves = {(r.arm, r.seed): r.curve for r in make_runs()}

    def fake_arm(config, arm, seed, source):
        csv = tmp_path / f"{arm}{seed}.csv"
        curves[(arm, seed)].to_csv(csv, index=False)
        if arm != "cold":  # as TaskVectorTransport does: the log dir (here a logger's folder)
            run_dir = Path(config.out_dir) / "runs" / f"{arm}_seed{seed}"
            report = tiny_transports()[f"theseus seed {seed}"]
            report.write_json(run_dir / "lightning_logs" / "version_0" / REPORT, overwrite=True)
        return csv

    monkeypatch.setattr(compare, "ensure_source", lambda config, console: "source.ckpt")
    monkeypatch.setattr(compare, "run_arm", fake_arm)
    console = Console(file=io.StringIO())
    s = compare.run_compare(config, console=console)
    # loss = 1 - acc: cold ends at 0.2, theseus gets there at steps 20 and 30
    assert s.metric == "val_loss" and s.mode == "min"
    assert s.arm("theseus").steps_to_target.values == (20.0, 30.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| theseus seed 0 | theseus | 1.0 |" in md and "| theseus seed 1 |" in md
    assert "| cold seed" not in md and "![per-layer update norms](transport_norms.png)" in md
    assert "## Config\n\n```yaml\nfit_config:\n- a.yaml\nout_dir: " in md
    assert "metric: val_loss\nmode: auto\n" in md
    s = compare.run_compare(replace(config, mode="max"), console=console, overwrite=True)
    assert s.mode == "max"

    path.write_text("fit_config: [a.yaml]\nout_dir: x\ntransport: {}\nmode: up\n")
    with pytest.raises(ValueError, match="mode: 'up' is not one of auto, max, min"):
        compare.CompareConfig.from_yaml(path)


# ---- transport and config sections --------------------------------------------------------------

def _mlp(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(12, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, 3))


@functools.lru_cache(maxsize=1)
def tiny_transports() -> dict[str, TransportReport]:
    """Real transport reports: a fine-tuned 8-wide MLP onto 16-wide ones (theseus, two seeds'
    calibration batches) and the slice baseline."""
    torch.manual_seed(0)
    source = _mlp(8)
    finetuned = copy.deepcopy(source)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reports = {}
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        calibration = [torch.randn(32, 12, generator=g) for _ in range(3)]
        reports[f"theseus seed {seed}"] = transport(source, finetuned, _mlp(16), calibration,
                                                    progress=False)
    reports["slice seed 0"] = transport(source, finetuned, _mlp(16), method="slice",
                                        progress=False)
    return reports


REPORT = "transport_report.json"
COMPARE_CONFIG = {"fit_config": ("a.yaml",), "arms": ["cold", "theseus", "slice"],
                  "transport": {"alpha": 1.0, "calibration_batches": 3}, "seeds": (0, 1)}


def test_report_transport_section_and_config_yaml(tmp_path):
    reports = tiny_transports()
    as_json = {name: r.write_json(tmp_path / name.replace(" seed ", "_seed") / REPORT)
               for name, r in reports.items()}
    # a report given as the object, as its dict and as its JSON path reads the same
    given = {"theseus seed 0": reports["theseus seed 0"],
             "theseus seed 1": reports["theseus seed 1"].to_dict(),
             "slice seed 0": as_json["slice seed 0"]}
    out = tmp_path / "rep"
    write_report(linear_runs(), out, title="linear", config=COMPARE_CONFIG, transports=given,
                 console=Console(file=io.StringIO()))
    md = (out / "report.md").read_text()
    order = ["**Verdict:**", "## Time to reach the reference's thresholds", "## Curves",
             "## Transport", "### Time split (seconds)",
             "| run | method | α | statistics | maps | rules | apply | other | total |",
             "| theseus seed 0 | theseus | 1.0 |", "| slice seed 0 | slice | 1.0 |",
             "### Maps by width", "| theseus seed 0 | 12 × 12 | 1 | 12 | 96 |",
             "| theseus seed 0 | 8 × 16 | 4 | 8 | 96 |", "| slice seed 0 | no maps | 0 |",
             "#### theseus seed 0: all 5 maps", "| 0:in | 12 × 12 | 12 | 96 |",
             "| 2:out | 8 × 16 | 8 | 96 |", "#### theseus seed 1: all 5 maps",
             "### Per-layer update norms", "![per-layer update norms](transport_norms.png)",
             "## Config", "```yaml\nfit_config:\n- a.yaml\narms:\n- cold\n- theseus\n- slice\n"
             "transport:\n  alpha: 1.0\n  calibration_batches: 3\nseeds:\n- 0\n- 1\n```"]
    at = [md.find(piece) for piece in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at))
    assert "slice seed 0: all" not in md  # no empty map table
    total = reports["theseus seed 0"].timings["total"]
    assert f"| {total:.3f} |" in md

    img = mpimg.imread(out / "transport_norms.png")
    assert img.ndim == 3 and img.shape[1] > 700
    page = (out / "report.html").read_text()
    pngs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert [base64.b64decode(p) for p in pngs] == [
        (out / "convergence.png").read_bytes(), (out / "transport_norms.png").read_bytes()]
    assert "<details open><summary>theseus seed 0: all 5 maps" in page
    assert "<pre>fit_config:\n- a.yaml\narms:" in page
    assert "src='http" not in page and "<link" not in page and "<script" not in page

    # a list of JSON paths is named after the run directories
    write_report(linear_runs(), out, title="linear", transports=list(as_json.values())[::-1],
                 overwrite=True, console=Console(file=io.StringIO()))
    md = (out / "report.md").read_text()
    assert md.find("| slice seed 0 | slice |") < md.find("| theseus seed 1 | theseus |")
    missing = {"x": tmp_path / "missing.json"}
    with pytest.raises(FileNotFoundError, match=r"missing.json \(run 'x'\) does not exist"):
        write_report(linear_runs(), out, title="linear", transports=missing, overwrite=True,
                     console=Console(file=io.StringIO()))


def test_update_norms_per_layer():
    params = [{"name": "blocks.0.attn.qkv.weight[0:4]", "norm_target": 3.0, "norm_source": 1.0},
              {"name": "blocks.0.attn.qkv.weight[4:8]", "norm_target": 4.0, "norm_source": 1.0},
              {"name": "blocks.0.attn.qkv.bias", "norm_target": 0.0, "norm_source": 1.0},
              {"name": "head.weight", "norm_target": 2.0, "norm_source": 2.0}]
    assert layer_norms(params, "norm_target") == {"blocks.0.attn.qkv": 5.0, "head": 2.0}
    assert layer_norms(params, "norm_source") == pytest.approx({"blocks.0.attn.qkv": 3 ** 0.5,
                                                                 "head": 2.0})
    fig = plot_update_norms({"theseus seed 0": {"params": params},
                             "theseus seed 1": {"params": params[:1]}})
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["source ||τ_A||", "theseus seed 0 ||τ_B||",
                                                    "theseus seed 1 ||τ_B||"]
    np.testing.assert_allclose(lines[1].get_ydata(), [5.0, 2.0])
    assert np.isnan(lines[2].get_ydata()[1]) and lines[2].get_linestyle() == "--"
