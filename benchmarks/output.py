"""What every benchmark ends with: the JSON document, its markdown table, and the JSON file."""

from __future__ import annotations

import json


def emit(doc: dict, table: str, path: str | None = None) -> None:
    print(json.dumps(doc, indent=2))
    print(table)
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
