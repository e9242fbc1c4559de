"""The bench's child process: ``python -m sdxl_ui.bench SPEC.json`` (see timing.run_child)."""
import sys

from .timing import child_main

child_main(sys.argv[1:])
