"""AUTOMATIC1111's ``styles.csv`` (``--styles FILE``): named prompt and negative-prompt texts a request's ``styles``
applies (``adapter.apply_styles``) and ``GET /prompt-styles`` lists. Columns as A1111 writes them: name, prompt,
negative_prompt (a header row; other columns are ignored)."""
from __future__ import annotations

import csv
from pathlib import Path

from ..schema import ValidationError

MAX_STYLES_BYTES = 4 * 1024 * 1024


def read_styles(path) -> dict[str, tuple[str, str]]:
    """name → (prompt, negative prompt), in the file's order; a file that cannot be read is refused by name."""
    file = Path(path)
    shown = file.name or str(path)
    try:
        if file.stat().st_size > MAX_STYLES_BYTES:
            raise ValidationError("styles", shown, f"is larger than {MAX_STYLES_BYTES // 1024**2} MB")
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValidationError("styles", shown, "does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError("styles", shown, f"cannot be read as UTF-8 text ({type(exc).__name__})") from None
    rows = csv.DictReader(text.splitlines())
    if not rows.fieldnames or "name" not in rows.fieldnames or "prompt" not in rows.fieldnames:
        raise ValidationError("styles", shown, "needs A1111's header row: name,prompt,negative_prompt")
    styles: dict[str, tuple[str, str]] = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = ((row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
    return styles


def style_list(styles: dict) -> list[dict]:
    """GET /prompt-styles, in A1111's shape."""
    return [{"name": n, "prompt": p, "negative_prompt": neg} for n, (p, neg) in styles.items()]
