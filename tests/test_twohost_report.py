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


def passes(steps: list[float], speeds: list[float], rate: str = "10gbit") -> list[dict]:
    """One configuration measured in several passes of the sweep, each pass with its own profile
    (a processor ``speed`` times as fast) and its own measured link."""
    recs = []
    for i, (step, speed) in enumerate(zip(steps, speeds)):
        prof = costmodel.Profile.from_json(json.dumps(PROFILE)).scaled(speed)
        rows = [
            {
                "scheme": "a/pipelined",
                "step": step,
                "drift": 1.0 + i,
                "bytes": 11_650_000,
                "compute": 0.9 * step,
                "profile": json.loads(prof.to_json()),
            },
            {"scheme": "ddp/powersgd", "step": 4.0 + i, "bytes": 640_000, "wire": None},
        ]
        rec = record(rows, rate)
        rec["bytes_per_s"] = 7e8 * (1 + 0.1 * i)
        recs.append(rec)
    return recs


def test_passes_aggregate_to_medians_each_predicted_from_its_own_profile():
    recs = passes([1.0, 1.6, 1.1], [1.0, 0.5, 2.0]) + passes([3.0], [1.0], rate="100mbit")
    twohost_report.repredict(recs)
    own = [r["rows"][0]["predicted"] for r in recs[:3]]
    assert len(set(own)) == 3  # each pass predicted from its own profile
    merged = twohost_report.aggregate(recs)
    assert [(m["rate"], m.get("passes")) for m in merged] == [("10gbit", 3), ("100mbit", None)]
    row, psgd = merged[0]["rows"]
    assert row["step"] == 1.1  # the median, not the mean (1.233)
    assert row["predicted"] == sorted(own)[1]
    assert row["drift"] == 2.0 and row["passes"] == 3
    assert row["spread"] == pytest.approx((1.6 - 1.0) / 1.1)
    assert row["pass_errors"] == pytest.approx([p / s - 1 for p, s in zip(own, [1.0, 1.6, 1.1])])
    assert merged[0]["bytes_per_s"] == pytest.approx(7e8 * 1.1)  # the link's median
    assert psgd["predicted"] is None and psgd["wire"] is None and psgd["step"] == 5.0 and psgd["pass_errors"] == []
    assert merged[1]["rows"][0]["step"] == 3.0  # another rate's single line passes through


def test_the_aggregated_table_shows_the_spread_and_what_one_pass_would_have_said():
    recs = passes([1.0, 1.6, 1.1], [1.0, 0.5, 2.0])
    twohost_report.repredict(recs)
    [merged] = twohost_report.aggregate(recs)
    text = twohost_report.tables([merged])
    header, line = text.splitlines()[0], next(x for x in text.splitlines() if "| a/pipelined |" in x)
    assert "step spread over passes" in header
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[9] == f"{(1.6 - 1.0) / 1.1:.1%}"
    one = [int(abs(e) <= 0.15) for e in merged["rows"][0]["pass_errors"]]
    assert "one pass alone would have had " + ", ".join(f"{n} of 1" for n in one) + " within 15%" in text
    assert "medians over 3 passes" in text
