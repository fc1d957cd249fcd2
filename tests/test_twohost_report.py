"""bench/twohost_report.py's cost-model rows: each run predicted from its profile, and with the
compute anchored to its scheme's serialised run (bench/schemes.py's ``anchored``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the report imports its neighbours as top-level modules

import schemes
import twohost_report

from hybridpar import costmodel

PROFILE = json.loads((ROOT / "docs" / "profiles" / "cpu_1thread_fp32_b256.json").read_text())


def record(rows: list[dict], rate: str = "10gbit") -> dict:
    """One sweep line as bench/schemes.py --json writes it (the link: a fast one, so that compute
    sets the step and a slower processor shows in full)."""
    return {
        "rate": rate,
        "batch": 16,
        "K": 2,
        "alpha_s": 4e-4,
        "bytes_per_s": 7e8,
        "cpu_s_per_byte": 0.0,
        "rows": rows,
        "profile": PROFILE,
    }


LINK = costmodel.Link(4e-4, 7e8, 0.0, burst_bytes=costmodel.tbf_burst("10gbit"))


def model_compute(prof: costmodel.Profile, scheme: str) -> float:
    return costmodel.step_time(prof, LINK, scheme, 2, 16, overlap=False).compute_s


def test_a_row_is_predicted_from_its_profile_and_anchored_to_its_serialised_compute():
    prof = costmodel.Profile.from_json(json.dumps(PROFILE))
    slower = 1.25 * model_compute(prof, "a")  # the serialised run measured a processor 25% slower
    rows = [
        {"scheme": "a/pipelined", "step": 2.0, "bytes": 11_650_000, "compute": slower},
        {"scheme": "ddp", "step": 3.0, "bytes": 244_400_000},
    ]
    twohost_report.repredict([record(rows)])
    hybrid, ddp = rows
    alone = twohost_report.predict(prof, LINK, "a/pipelined", 2, 16)
    assert hybrid["predicted"] == pytest.approx(alone)
    assert hybrid["predicted_anchored"] == pytest.approx(schemes.anchored(prof, LINK, "a", "pipelined", 2, 16, slower))
    # Compute-bound on this link: a processor 25% slower makes the step nearly 25% longer.
    assert 1.15 < hybrid["predicted_anchored"] / hybrid["predicted"] < 1.3
    assert ddp["predicted_anchored"] is None  # no serialised run to anchor to


def test_anchoring_to_the_models_own_compute_changes_nothing():
    prof = costmodel.Profile.from_json(json.dumps(PROFILE))
    for scheme, variant in (("a", "pipelined+mb4"), ("c", "pipelined+chunk"), ("b", "bucketed")):
        own = model_compute(prof, scheme)
        assert schemes.anchored(prof, LINK, scheme, variant, 2, 16, own) == pytest.approx(
            schemes.predict(prof, LINK, scheme, variant, 2, 16).step_s
        )


def test_the_table_shows_both_errors_and_the_probe_drift():
    step = 1.0
    rows = [{"scheme": "a/pipelined", "step": step, "drift": 1.3, "bytes": 11_650_000, "compute": 0.9}]
    rec = record(rows)
    twohost_report.repredict([rec])
    text = twohost_report.tables([rec])
    line = next(x for x in text.splitlines() if "| a/pipelined |" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6] == f"{rows[0]['predicted'] / step - 1:+.1%}"  # from the profile alone
    assert cells[7] == f"{rows[0]['predicted_anchored'] / step - 1:+.1%}"  # compute anchored
    assert cells[6] != cells[7]
    assert cells[8] == "1.300"  # the probe's drift
    raw, anch = (abs(rows[0][k] / step - 1) for k in ("predicted", "predicted_anchored"))
    assert f"{int(raw <= 0.15)} of 1 within 15%. With the compute anchored" in text
    assert f"largest {anch:.1%}, {int(anch <= 0.15)} of 1 within 15%." in text


def test_old_records_have_no_drift_column():
    rows = [{"scheme": "a/pipelined", "step": 1.0, "bytes": 11_650_000, "compute": 0.9}]
    rec = record(rows)
    twohost_report.repredict([rec])
    header = twohost_report.tables([rec]).splitlines()[0]
    assert "drift" not in header and "compute anchored" in header


def test_within_counts_the_bound_inclusive():
    assert twohost_report.within([0.0, 0.149, 0.15, 0.151, 0.3]) == 3
