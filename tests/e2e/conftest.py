"""Fixtures of the end-to-end tests (helpers are in e2e_helpers.py)."""
from __future__ import annotations

import json
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager


@pytest.fixture(scope="session")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """A KernelSpecManager whose only ``python3`` runs ``sys.executable``."""
    kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
    spec = kernels / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (poolmagic e2e)",
                "language": "python",
                "interrupt_mode": "signal",
                "env": {"PYTHONUNBUFFERED": "1"},
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
    assert ksm.get_kernel_spec("python3").argv[0] == sys.executable
    return ksm
