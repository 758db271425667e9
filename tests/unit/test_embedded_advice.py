"""What the demo tells a newcomer when it has no servers to start: advice that works on their machine."""

from __future__ import annotations


def test_the_demos_advice_fits_the_machine() -> None:
    """On arm64 the demo does not advise the embedded extra (no pgserver wheel there) but the distribution's servers."""
    from daemon.commands.embedded import install_advice

    for machine in ("aarch64", "arm64"):
        advice = install_advice(machine)
        assert "pip install" not in advice
        assert "apt-get install -y redis-server postgresql" in advice
        assert "REDIS_URL and DATABASE_URL" in advice
    assert "pip install 'seatwatch[embedded]'" in install_advice("x86_64")
