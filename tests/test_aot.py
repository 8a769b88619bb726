"""Ahead-of-time checks of the Triton kernels for real GPU targets, run without a GPU.

The launchers are driven in a subprocess without ``TRITON_INTERPRET`` (kernels decorated for the
interpreter cannot be compiled for a GPU), so these run in the default CPU tier.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def run_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "fastattr.kernels.aot", "--json", str(report), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode == 2:
        pytest.skip(done.stdout.strip() or done.stderr.strip())
    assert report.exists(), done.stdout + done.stderr
    return done, json.loads(report.read_text())


def test_every_grid_fits_cuda_and_fills_an_h100(tmp_path):
    done, report = run_check(tmp_path, "--no-compile", "--full")
    assert report["failures"] == [], "\n".join(report["failures"])
    assert done.returncode == 0
    # a sample of 2^31 + elements: the grid is flat (axis x), never over 65,535 on y or z
    big = [launch for launch in report["launches"] if "width > 2^31" in launch["launch"]]
    assert big and all(launch["grid"][1] == 1 and launch["grid"][2] == 1 for launch in big)
    assert all(launch["blocks"] * launch["config"]["BLOCK"] >= (1 << 16) + 3 for launch in big)
    # the row path fills two waves of 132 SMs at every product shape
    rows = [launch for launch in report["launches"]
            if launch["kernel"] == "_row_partial_kernel" and " B=" in launch["launch"]]
    assert {launch["launch"].split(" ", 3)[3] for launch in rows} >= {"B=4 H=4 N=128", "B=4 H=4 N=2048",
                                                                       "B=32 H=4 N=100"}
    assert min(launch["blocks"] for launch in rows) >= 264


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80_without_spills(tmp_path):
    done, report = run_check(tmp_path, "--arch", "90", "80")
    assert report["failures"] == [], "\n".join(report["failures"][:20])
    assert done.returncode == 0
    compiled = report["compiled"]
    kernels = {c["key"].split()[0] for c in compiled}
    assert kernels == {"_interpolate_kernel", "_accumulate_kernel", "_finalize_kernel", "_interpolate_rows_kernel",
                       "_density_kernel", "_row_partial_kernel", "_row_combine_kernel", "_cam_kernel"}
    assert {c["arch"] for c in compiled} == {90, 80}
    assert all(c["error"] is None and c["spilled_bytes"] == 0 for c in compiled)
    # the pipelined loops really are pipelined (cp.async) in the IG reduction
    assert all("cp.async" in c["notes"] for c in compiled if c["key"].startswith("_accumulate_kernel"))
