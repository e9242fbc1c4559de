"""Issue 13, finding 4: the requirements never install an xformers that cannot load beside the torch they install."""
import importlib.metadata
import json
import re
from pathlib import Path

from tests.helpers import ROOT


def pins(path: Path) -> dict[str, str]:
    """name -> pinned version (==), environment markers dropped; names of unpinned lines map to ''."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if line and not line.startswith("-"):
            match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)\s*(==\s*([^,\s]+))?", line)
            out[match.group(1).lower()] = match.group(3) or ""
    return out


def built_for(path: Path) -> dict[str, str]:
    """The 'xformers X -> torch Y' pairs listed in the header of requirements-xformers.txt."""
    return dict(re.findall(r"xformers (\S+) -> torch (\d+\.\d+\.\d+)", path.read_text()))


def test_requirements_txt_installs_no_xformers():
    # It used to pin xformers==0.0.35 (built for torch 2.10.0) beside torch>=2.4: on any other torch its kernels
    # never load.
    assert "xformers" not in pins(ROOT / "requirements.txt")


def test_the_optional_xformers_file_pins_a_pair_that_was_built_together():
    path = ROOT / "requirements-xformers.txt"
    pinned, pairs = pins(path), built_for(path)
    assert pinned["xformers"] and pinned["torch"]
    assert pairs[pinned["xformers"]] == pinned["torch"]
    try:  # where an xformers wheel is installed, its own build record must agree with the table
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        return
    record = Path(importlib.metadata.distribution("xformers").locate_file("xformers/cpp_lib.json"))
    if version in pairs and record.is_file():
        torch_built = json.loads(record.read_text())["version"]["torch"].split("+")[0]
        assert torch_built == pairs[version]
