"""The GPU machine's script, dry-run on the CPU: its checks run and pass here (no GPU needed)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_equivalence_dry_run_on_the_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "device_equivalence.py"), "--cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 32 and all(line.startswith("ok ") for line in lines)  # 4 methods x 2 reductions x 2 x 2


def test_device_check_script_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "device_check.sh")]).returncode == 0
