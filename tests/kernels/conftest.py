"""Fixtures shared by the kernel tests, and the Hypothesis settings profiles of the kernel fuzz tests.

Profiles (``HYPOTHESIS_PROFILE``, default ``ci``): ``ci`` replays the committed example database
(``tests/kernels/hypothesis-db``, read-only) and then tries a fixed budget of examples, sized to keep
``test_fuzz_kernels.py`` under about two minutes on two CPU cores; ``campaign`` tries 50x as many and saves every
failing example it finds into that database, so the next CI run replays it (commit the new files).
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

FUZZ_DB = Path(__file__).parent / "hypothesis-db"
CI_EXAMPLES = 150

_fuzz = dict(deadline=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=CI_EXAMPLES,
                          database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(FUZZ_DB)), **_fuzz)
settings.register_profile("campaign", max_examples=50 * CI_EXAMPLES,
                          database=DirectoryBasedExampleDatabase(FUZZ_DB), **_fuzz)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunk workspaces of 7 rows (statistics sub-chunks of 3), so the chunked paths run several chunks on tiny
    inputs."""
    from t3s_kernels.linear_ce import chunked

    real_plan = chunked.plan_chunks

    def plan(*a, **k):
        p = real_plan(*a, **k)
        rows = min(p.rows, 7)
        return p._replace(rows=rows, stats_rows=min(p.stats_rows, 3, rows))

    monkeypatch.setattr(chunked, "plan_chunks", plan)
