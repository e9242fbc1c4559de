"""The CLI as a user runs it: ``python -m sdxl_ui`` in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.common import ROOT


def cli(*args, check_json=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sdxl_ui", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    return proc
