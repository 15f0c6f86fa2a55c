"""What the benchmark scripts share: writing their JSON and printing its summary."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, results: dict) -> None:
    """Write ``results`` as JSON to ``out`` (folders created) and print it without its per-run rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(f"written {out}")
