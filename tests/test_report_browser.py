"""The HTML report in a real browser: headless Chromium lays it out, every image decodes and every
section is there, in order.

The report holds no script; the test renders a copy of it with a probe script appended, which
waits for the page to load and writes what the browser saw (each section's position and height,
each image's decoded size) into the DOM that ``--dump-dom`` prints. Needs Debian's ``chromium``
package (``.ci/run`` installs it); skipped with the reason when it is not there.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image
from rich.console import Console

from warmstart.experiments.report import write_report

from .test_report import COMPARE_CONFIG, linear_runs, tiny_transports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ["verdict", "thresholds", "budgets", "legacy", "curves", "transport", "config"]

PROBE = """<script>
window.addEventListener("load", () => {
  // "load" fires once every image has loaded (or failed), so the probe can run at once: an
  // asynchronous probe could finish after --dump-dom has already printed the page.
  const images = [...document.images];
  const result = {
    sections: [...document.querySelectorAll("body > section")].map(
      s => ({id: s.id, top: s.getBoundingClientRect().top + window.scrollY,
             height: s.getBoundingClientRect().height})),
    images: images.map(img => ({alt: img.alt, complete: img.complete, width: img.naturalWidth,
                                height: img.naturalHeight,
                                section: img.closest("section") && img.closest("section").id})),
  };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


class _Probe(HTMLParser):
    """The text of ``<pre id="probe">`` in the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.inside, self.text = False, ""

    def handle_starttag(self, tag, attrs):
        self.inside = self.inside or (tag == "pre" and ("id", "probe") in attrs)

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "pre"

    def handle_data(self, data):
        if self.inside:
            self.text += data


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install "
                    "-y chromium; .ci/run installs it): the report is not rendered in a browser")
def test_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "rep"
    write_report(linear_runs(), out, title="linear", config=COMPARE_CONFIG,
                 transports=tiny_transports(), console=Console(file=io.StringIO()))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "src='http" not in page and "<link" not in page
    # every image is embedded and is a valid PNG as written
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    for src in sources:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()

    probe_page = out / "probe.html"
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000",
           "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()]
    for _ in range(3):  # a headless browser start can fail on a loaded machine; try again
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        parser = _Probe()
        parser.feed(done.stdout)
        if parser.text:
            break
    assert parser.text, f"no probe result in the dumped DOM; stderr: {done.stderr[-3000:]}"
    seen = json.loads(parser.text)

    sections = seen["sections"]
    assert [s["id"] for s in sections] == SECTIONS
    tops = [s["top"] for s in sections]
    assert tops == sorted(tops) and all(s["height"] > 0 for s in sections), sections

    images = seen["images"]
    assert [(i["alt"], i["section"]) for i in images] == [
        ("convergence", "curves"), ("per-layer update norms", "transport")]
    for image, src in zip(images, sources):
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as png:
            assert image["complete"] and (image["width"], image["height"]) == png.size, image
