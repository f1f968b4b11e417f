import subprocess
import sys

from mpdcompress.cli import main


def test_demo_runs_end_to_end_and_checks_exactness(capsys):
    assert main(["demo", "--steps", "60", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exactness check: PASS" in out
    assert "26,800" in out  # packed LeNet-300-100 weights at c=10 (padded 784x300 blocks)


def test_cli_reports_invalid_factor_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "mpdcompress", "demo", "-c", "500", "--steps", "1", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "valid range for a 300x784 weight is 1..300" in proc.stderr
    assert "Traceback" not in proc.stderr
