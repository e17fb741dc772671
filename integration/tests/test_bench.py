"""The aggregation benchmark runs end to end on small sizes and measures what it claims."""

from __future__ import annotations

import json
from pathlib import Path

from bench.aggregate import METHODS, main, report


def test_quick_benchmark_writes_times_ratios_memory_and_sketch_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["--dims", "512", "--clients", "4", "8", "16", "--ranks", "4", "--repeats", "1",
                 "--dense-repeats", "1", "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert [(x["n"], x["r"]) for x in res["rows"]] == [(4, 4), (8, 4), (16, 4)]
    for x in res["rows"]:
        assert set(x["seconds"]) == set(METHODS)
        assert all(t > 0 for t in x["seconds"].values())
        # The dense path allocates the d x k mean: its peak extra memory is at least that.
        assert x["peak_extra_bytes"]["dense"] >= x["dense_bytes"]
        # An RMS sine of principal angles (its accuracy is property-tested in test_randomized).
        assert 0.0 <= x["sketch_sin_rms"] <= 1.0
    # Three client counts: an over-determined fit of the N exponent.
    assert set(res["exponents"]["fedit"]) == {"N"}
    assert "glora_exact/fedit" in report(res)
