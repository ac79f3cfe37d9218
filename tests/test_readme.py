"""The README's Python examples run as written (in a scratch directory, in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    warm, tracker = namespace["warm"], namespace["tracker"]
    assert warm.applied and warm.report.alpha in warm.report.options["alpha_grid"]
    assert (tmp_path / "source_finetuned.ckpt").exists() and tracker.written.exists()
    assert (tmp_path / "transport_report.json").exists()
    assert namespace["report"].method == "theseus"
