"""Fixtures shared by the kernel tests."""

import pytest


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
