"""The two files every benchmark report is: the JSON of its measurements and the Markdown rendered from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(out: Path, payload: dict, render: Callable[[dict], str]) -> None:
    """``out`` (Markdown, from ``render(payload)``) and ``out`` with a .json suffix (``payload``)."""
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.write_text(render(payload))
    print(f"wrote {out}")
