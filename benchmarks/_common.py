"""What the benchmark scripts share: writing their JSON and printing its summary, and the one key
under which a script's JSON holds figures that the run did not measure."""

from __future__ import annotations

import json
from pathlib import Path

#: Figures written into a benchmark's JSON that this run did not measure (scvi-tools runs made earlier
#: by hand, a paper's values) go under this key only, as ``{"value": ..., "source": "..."}``;
#: tests/test_benchmarks_json.py fails on a literal number anywhere else in a JSON dict of a script.
NOT_MEASURED = "reference_not_measured_by_this_run"


def write_results(out: str | Path, results: dict) -> None:
    """Write ``results`` as JSON to ``out`` (folders created) and print it without its per-run rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(f"written {out}")
