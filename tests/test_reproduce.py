"""`python benchmarks/reproduce.py --quick` (the CI mode of the reproduction suite) runs and writes its report."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_quick_writes_report_plots_and_verdicts(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    claims = [line for line in report.splitlines() if line.startswith("| ") and line.rstrip().endswith("** |")]
    assert len(claims) >= 8 and all("**agrees**" in c or "**disagrees**" in c for c in claims)
    for section in ("Matching methods", "Width", "Training time", "VGG11 and ResNet20", "MergeMany", "Disjoint data (Figure 5)"):
        assert f"## {section}" in report
    for png in ("methods.png", "width.png", "epochs.png", "conv.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"({png})" in report
    results = json.loads((tmp_path / "results.json").read_text())
    barriers = results["methods"]["barriers"]
    assert all(math.isfinite(v) for rows in barriers.values() for split in rows.values() for v in split)
    # Alignment removes most of an MLP's barrier: if the library broke, this would not hold.
    assert barriers["weight"]["held_out"][0] < 0.5 * barriers["naive"]["held_out"][0]
    assert set(results["conv"]) == {"VGG11-BN", "VGG11-LN", "ResNet20-BN", "ResNet20-LN"}
    # The regime the BN rows once collapsed in (aligned + BN reset at chance for both nets, barrier ~ln 10 minus the
    # endpoints' loss; and stale running statistics that made eval-mode endpoints bad and the naive barrier 0):
    # the reset midpoint of activation-matched BN nets is far above chance and far below the uncorrected one.
    for title in ("VGG11-BN", "ResNet20-BN"):
        rows = results["conv"][title]
        assert rows["naive"][0] > 0.5, (title, rows)
        assert rows["activation_midpoint_acc"][0] > 0.35, (title, rows)
        assert rows["activation_corrected"][0] < 0.6 * rows["activation_aligned"][0], (title, rows)
