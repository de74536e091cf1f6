"""The report opened in a real headless Chromium: every image decodes (naturalWidth > 0) and the tables render.

The page records this itself on load (in a hidden #render-check element) and Chromium's --dump-dom prints the
DOM after that. Needs the Debian package `chromium` (.ci/run installs it); skipped without it except in CI.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch

import limoe
from limoe.analysis import AnalysisConfig, analyze_routing
from limoe.analysis.report import write_report
from _analysis_forced import WordTokenizer, images

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
WORDS = ["red", "blue", "circle", "square"]


def rendered(index, tmp_path) -> dict:
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing in CI; .ci/run installs it with apt-get")
        pytest.skip("chromium not installed (Debian: apt-get install chromium); CI installs it and runs this test")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           # Virtual time lets the page finish loading (and its load handler run) before the DOM is dumped.
           "--virtual-time-budget=10000", "--dump-dom", index.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="render-check"[^>]*>([^<]*)</pre>', proc.stdout)
    assert match and match.group(1), f"page did not report its rendering; chromium stderr:\n{proc.stderr[-2000:]}"
    return json.loads(match.group(1))


def test_moe_report_renders_with_images_and_tables(tmp_path):
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", num_experts=4, vocab_size=8)
    result = analyze_routing(model, WordTokenizer(WORDS), zip(images(8), ["red circle", "blue square"] * 4),
                             AnalysisConfig(batch_size=4))
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "total_loss": 1.0 / (i + 1), "layer1/routing_success/image": 0.9}) + "\n"
        for i in range(5)))
    index = write_report(result, tmp_path / "report", metrics_path=tmp_path / "metrics.jsonl")
    check = rendered(index, tmp_path)
    assert check["images"] == 6 and check["loaded"] == 6, check  # five routing plots + training curves
    assert check["tables"] == 2 + 2 * len(result.layers) and check["rows"] > 20, check


def test_dense_report_renders(tmp_path):
    result = analyze_routing(limoe.create_model("dense-tiny", vocab_size=8), WordTokenizer(WORDS),
                             zip(images(2), ["red", "blue"]))
    check = rendered(write_report(result, tmp_path / "dense"), tmp_path)
    assert check == {"images": 0, "loaded": 0, "tables": 1, "rows": 9}  # the settings table: header + 8 settings
