"""The soak, CI-sized: bench/soak.py's whole machinery (TLS Redis, a private Postgres behind PgBouncer in
transaction mode, two daemons, seat churn, every fault type once) compressed into about a minute."""

from __future__ import annotations

import pytest

from tests.support.soak import FAULTS, Soak, render

pytestmark = pytest.mark.slow


@pytest.mark.timeout(150)
def test_a_minute_of_every_fault_loses_and_doubles_nothing() -> None:
    """Every fault type once against two ticking daemons: the exact ledger (0 lost, 0 duplicated, none to
    ineligible users), every fault recovered, Redis commands per section within the 1.5 target."""
    soak = Soak(
        minutes=1.0,
        sections=200,
        fault_every_s=4.5,
        fault_window_s=2.5,
        calm_s=12,
        first_fault_s=5,
        seed=11,
        churn_every_s=5,
        churn_fraction=0.1,
        sample_every_s=5,
        daemon_overrides={"SEATWATCH_BREAKER_RECOVERY_S": "2"},
        wait_for_work=False,  # with ticks a minute apart, "a section checked since" could wait out a whole minute
        log=lambda text: None,
    )
    report = soak.run()
    text = render(report)
    assert report.ok, text
    assert {i.fault for i in report.injections} == set(FAULTS), text
    assert report.ledger["owed"] > 0, text
    assert report.ledger["owed"] == report.ledger["delivered"], text
    per_section = report.steady["redis_commands_per_section"]
    assert per_section is not None
    assert per_section <= 1.5, text
