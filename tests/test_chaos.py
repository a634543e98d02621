"""The short subset of `make chaos` (tests/chaos.py): one kill -9 per service, small sizes.

Real processes and the session's broker; asserts what must hold (nothing missing, no duplicate
with different content), prints the table (time to resume is measured, never asserted).
Cost: about 3-4 minutes on 2 cores (three service start-ups, two restarts, ~12 prompts x 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos import Chaos, table

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_one_kill_per_service_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    chaos = Chaos(tmp_path / "chaos", bootstrap=kafka_bootstrap, prompts=8, events=120, broker_down_s=0,
                  completion_timeout_s=240)
    try:
        rows = chaos.run_faults(["policy", "reward", "preference"])
    finally:
        chaos.close()
    print("\n" + table(rows))
    for row in rows:
        assert row.missing == 0, row
        assert row.differing == 0, row
        assert row.found == (row.produced if row.fault.startswith("preference") else row.produced * 2), row
