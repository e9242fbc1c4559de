"""The front door: README.md stays short, every relative link in it and in docs/*.md lands on a file (and, for
``#anchor`` links into a markdown file, on a heading), and every ``python -m sdxl_ui SUBCOMMAND --flag`` and
``python app.py --flag`` the README (and each docs page) shows in code exists (its ``--help`` lists the flag)."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS = ("generate", "upscale", "doctor", "bench", "selftest", "train-demo", "eval-demo")
MAX_README_LINES = 300

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
COMMAND = re.compile(r"python\s+(?:-m\s+sdxl_ui\s+(?P<sub>[\w-]+)|(?P<app>app\.py))(?P<rest>[^\n]*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def prose(text: str) -> str:
    """The text without its fenced code blocks and inline code spans (neither holds links)."""
    return INLINE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, markup and punctuation other than '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = anchor(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return frozenset(found)


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)]  # http:, https:, mailto: …


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_readme_keeps_its_front_door():
    text = README.read_text()
    assert "![" in text and "(assets/screenshot.png)" in text
    assert "pip install -r requirements.txt && pip install --no-deps -r requirements-nodeps.txt" in text
    assert "python app.py --model demo" in text
    assert not re.search(r"\bissue \d+|(?<![\w&])#\d+\b|\bround \d+\b", prose(text), re.I), \
        "issue numbers and rounds belong in CHANGELOG.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_anchor_rule():
    assert anchor("What each optimization does, on which device") == "what-each-optimization-does-on-which-device"
    assert anchor("Set-up (two commands)") == "set-up-two-commands"
    assert anchor("`--model` and snake_case") == "--model-and-snake_case"


def code_texts(text: str) -> list[str]:
    """Every code block (its continued lines joined) and every inline code span of a markdown text."""
    blocks = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    return blocks + [span.replace("\n", " ") for span in INLINE.findall(FENCE.sub("", text))]


def shown_flags(text: str) -> dict[str, set[str]]:
    """Subcommand (or 'app.py') -> the --flags shown after it, each shell command on its own."""
    shown: dict[str, set[str]] = {}
    for code in code_texts(text):
        for line in code.splitlines():
            line = re.sub(r"'[^']*'|\"[^\"]*\"", "''", line)  # quoted values are not flags
            line = re.split(r"(?:^|\s)#", line)[0]  # nor comments
            for piece in re.split(r"&&|\|\||\s\|\s|;", line):  # `a|b` inside a flag's choices stays
                match = COMMAND.search(piece)
                if match:
                    shown.setdefault(match["sub"] or "app.py", set()).update(FLAG.findall(match["rest"]))
    return shown


@functools.lru_cache(maxsize=None)
def help_text(command: str) -> str:
    argv = [sys.executable, "app.py"] if command == "app.py" else [sys.executable, "-m", "sdxl_ui", command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv[1:])} --help exited {done.returncode}: {done.stderr[-500:]}"
    return done.stdout


def test_the_readme_shows_commands():
    shown = shown_flags(README.read_text())
    assert "app.py" in shown and "generate" in shown  # the parser finds them at all


@functools.lru_cache(maxsize=None)
def shown_on_pages() -> dict[str, dict[str, list[str]]]:
    """Subcommand -> flag -> the pages (README.md, CHANGELOG.md, docs/*.md) that show it."""
    shown: dict[str, dict[str, list[str]]] = {}
    for page in PAGES:
        for command, flags in shown_flags(page.read_text()).items():
            for flag in flags:
                shown.setdefault(command, {}).setdefault(flag, []).append(str(page.relative_to(ROOT)))
    return shown


@pytest.mark.parametrize("command", [*SUBCOMMANDS, "app.py"])
def test_every_flag_shown_exists(command: str):
    """The README's commands first of all; the docs pages' too, since a newcomer copies from them as well."""
    shown = shown_on_pages()
    unknown = sorted(set(shown) - set(SUBCOMMANDS) - {"app.py"})
    assert not unknown, f"the pages show subcommands that do not exist: {unknown}"
    if command not in shown:
        pytest.skip(f"no page shows {command}")
    listed = help_text(command)
    missing = {flag: pages for flag, pages in sorted(shown[command].items())
               if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", listed)}
    where = "python app.py" if command == "app.py" else f"python -m sdxl_ui {command}"
    assert not missing, f"shown with {where} but not in its --help: {missing}"


def test_the_command_parser():
    sample = ("```bash\npython -m sdxl_ui generate --model demo \\\n    --prompt \"a --not-a-flag\" --seed 3  # --nor-this\n"
              "python app.py --api && python -m sdxl_ui doctor --json | less\n```\nand `python app.py --share` inline")
    assert shown_flags(sample) == {"generate": {"--model", "--prompt", "--seed"}, "app.py": {"--api", "--share"},
                                   "doctor": {"--json"}}
    assert not re.search(r"(?<![\w-])--no-such-flag(?![\w-])", help_text("generate"))
