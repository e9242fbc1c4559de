"""What several test files share (fixtures stay in conftest.py). Import it as ``from tests.helpers import ...``:
one module, so the RELIABILITY counts the tests fill are the ones conftest.py prints."""
from __future__ import annotations

from tests.helpers.app import ARGS, App, free_port, launched
from tests.helpers.cli import cli
from tests.helpers.common import (PROBES, RELIABILITY, ROOT, assert_other_picture, assert_same_picture,
                                 assert_same_weights, load_probe, run, weights)

__all__ = ["ARGS", "App", "PROBES", "RELIABILITY", "ROOT", "assert_other_picture", "assert_same_picture",
           "assert_same_weights", "cli", "free_port", "launched", "load_probe", "run", "weights"]
