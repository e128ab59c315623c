"""Host tier: on a kernel without IPVS the CLI says so in one line and exits 1."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.host


def test_status_on_a_kernel_without_ipvs_is_a_clear_error_not_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "dockerlb.cli", "status"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "no IPVS in this kernel" in done.stderr
    assert "Traceback" not in done.stderr
