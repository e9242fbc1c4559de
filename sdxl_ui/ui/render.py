"""Pure HTML rendering for the page: log, progress bar, status panel. Every user string is escaped here."""
from __future__ import annotations

import html

from ..schema import ServiceState

LOG_LIMIT = 400  # lines kept in the log pane per run


def log_html(lines: list[str]) -> str:
    body = "\n".join(html.escape(line) for line in lines[-LOG_LIMIT:])
    # column-reverse keeps the scroll position pinned to the newest line while lines stream in.
    return f'<div class="sdxl-logbox"><pre class="sdxl-log" id="sdxl-log">{body}</pre></div>'


def progress_html(fraction: float, line: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="sdxl-progress"><div class="sdxl-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="sdxl-step" id="sdxl-step">{html.escape(line)}</div>')


STATUS_MARK = {"active": "✓", "off": "–", "unavailable": "✗", "not_applicable": "n/a"}


def _state_label(state) -> str:
    """A ``ServiceState``'s display label (a state read back as a plain string is its own label)."""
    return state.label if isinstance(state, ServiceState) else str(state)


def status_html(status: dict) -> str:
    """status: {model, note, device, dtype, state, message, rows: [{name, status, detail}], share}."""
    e = html.escape
    parts = ['<div class="sdxl-status" id="sdxl-status">']
    parts.append(f"<div><b>Model</b> {e(status.get('model', '?'))}"
                 + (f' <span class="sdxl-demo">{e(status["note"])}</span>' if status.get("note") else "")
                 + f" · <b>Device</b> {e(str(status.get('device', '?')))}"
                 + f" · <b>Precision</b> {e(str(status.get('dtype', '?')))}"
                 + f" · <b>State</b> {e(_state_label(status.get('state', '?')))}</div>")
    if status.get("message"):
        parts.append(message_html(status["message"]))
    if status.get("share"):
        parts.append(f'<div class="sdxl-share">{e(status["share"])}</div>')
    if status.get("replicas") is not None:
        parts.append(replicas_html(status["replicas"]))
    rows = status.get("rows") or []
    if rows:
        source = "read back from the loaded pipeline" if status.get("source") == "pipeline" else "planned"
        active = [row["name"] for row in rows if row["status"] == "active"]
        parts.append(f'<details id="sdxl-report"><summary>Optimizations ({e(source)}): {len(active)} active — '
                     f'{e(", ".join(active) or "none")}</summary><table class="sdxl-report">')
        for row in rows:
            parts.append(f"<tr><td>{STATUS_MARK.get(row['status'], '?')}</td><td>{e(row['name'])}</td>"
                         f"<td>{e(row['status'])}</td><td>{e(row['detail'])}</td></tr>")
        parts.append("</table></details>")
    parts.append("</div>")
    return "".join(parts)


def message_html(message: str) -> str:
    """A status message as one sentence and, for a model that could not load, its ways out; the whole text
    folded beneath when there is more of it (the hub library's own message is long and repeats itself)."""
    e = html.escape
    text = str(message).strip()
    at = text.find("Ways out:")
    head, ways = (text[:at], text[at:]) if at >= 0 else (text, "")
    first = head.split("\n", 1)[0]
    for mark in (". ", "; "):
        if mark in first[:240]:
            first = first[:first.index(mark, 0, 240) + 1]
            break
    if len(first) > 240:
        first = first[:239] + "…"
    shown = (first.strip() + (" " + ways if ways else "")).strip()
    folded = f'<details class="sdxl-details"><summary>details</summary><pre>{e(text)}</pre></details>' \
        if shown != text else ""
    return f'<div class="sdxl-warn">{e(shown)}{folded}</div>'


def replicas_html(replicas: list[dict]) -> str:
    """Several workers (Ray backend): one line per replica, each with its own read-back report, since replicas on
    different hardware can differ."""
    e = html.escape
    parts = [f'<details open id="sdxl-replicas"><summary>Workers ({len(replicas)})</summary>'
             '<table class="sdxl-report"><tr><th>replica</th><th>node</th><th>pid</th><th>device</th>'
             '<th>model</th><th>state</th><th>jobs</th></tr>']
    for r in replicas:
        parts.append(f"<tr><td>{e(str(r.get('replica', '?')))}</td><td>{e(str(r.get('node', '?')))}</td>"
                     f"<td>{e(str(r.get('pid', '?')))}</td>"
                     f"<td>{e(str(r.get('device', '?')))} {e(str(r.get('dtype', '')))}</td>"
                     f"<td>{e(str(r.get('model', '?')))}</td><td>{e(str(r.get('state', '?')))}</td>"
                     f"<td>{e(str(r.get('jobs', '')))}</td></tr>")
        if r.get("message"):
            parts.append(f'<tr><td></td><td colspan="6" class="sdxl-warn">{e(str(r["message"]))}</td></tr>')
        rows = r.get("rows") or []
        if rows:
            source = "read back from its pipeline" if r.get("source") == "pipeline" else "planned"
            report = "; ".join(f"{STATUS_MARK.get(row['status'], '?')} {row['name']}" for row in rows)
            parts.append(f'<tr><td></td><td colspan="6"><details><summary>report ({e(source)}): {e(report)}'
                         "</summary><table>")
            for row in rows:
                parts.append(f"<tr><td>{STATUS_MARK.get(row['status'], '?')}</td><td>{e(row['name'])}</td>"
                             f"<td>{e(row['status'])}</td><td>{e(row['detail'])}</td></tr>")
            parts.append("</table></details></td></tr>")
    parts.append("</table></details>")
    return "".join(parts)


CSS = """
.sdxl-logbox {max-height: 22em; overflow-y: auto; display: flex; flex-direction: column-reverse;}
.sdxl-log {font-size: 0.85em; white-space: pre-wrap; margin: 0;}
.sdxl-progress {height: 0.6em; background: #ddd; border-radius: 0.3em; overflow: hidden;}
.sdxl-bar {height: 100%; background: #3b82f6; transition: width 0.2s;}
.sdxl-step {font-family: monospace; font-size: 0.9em; margin-top: 0.2em;}
.sdxl-status table {font-size: 0.8em; border-collapse: collapse;}
.sdxl-status td {padding: 0 0.5em; vertical-align: top;}
.sdxl-demo {background: #fde68a; color: #000; padding: 0 0.3em; border-radius: 0.2em;}
.sdxl-warn {background: #fee2e2; color: #7f1d1d; padding: 0.3em; border-radius: 0.2em; margin: 0.3em 0;}
.sdxl-details pre {white-space: pre-wrap; font-size: 0.85em; margin: 0.2em 0;}
.sdxl-share {background: #e0f2fe; color: #0c4a6e; padding: 0.3em; border-radius: 0.2em; margin: 0.3em 0;}
"""
