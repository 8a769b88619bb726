"""`fastattr bench` against the real PyHealth: its baselines are PyHealth's own methods."""
import pytest

from fastattr.demo import bench

pytestmark = pytest.mark.parity


def test_bench_case_times_pyhealth_after_checking_agreement():
    rows = bench.bench_case(length=12, steps=4, batch=3, layers=1, heads=2, dim=16, device="cpu", repeats=1,
                            use_pyhealth=True, use_captum=True)
    methods = {(r["workload"], r["method"]) for r in rows}
    assert {("integrated_gradients", "pyhealth"), ("integrated_gradients", "fastattr[torch]"),
            ("integrated_gradients", "captum"), ("chefer", "pyhealth"), ("chefer", "fastattr[torch]")} <= methods
    assert all(r["model"] == "pyhealth.Transformer" and r["max_rel_err"] <= 1e-4 for r in rows)


def test_user_call_rows_time_pyhealth_after_checking_every_patient():
    rows = bench.user_call_rows("chefer", patients=12, layers=2, heads=2, dim=16, steps=4, device="cpu", repeats=1,
                                use_pyhealth=True, longest=40)
    assert {r["baseline"] for r in rows} == {"pyhealth"} and len(rows) == 6
    assert all(r["model"] == "pyhealth.Transformer" and r["max_rel_err"] <= 1e-4 for r in rows)
