"""A short run of the soak test (loadtest/soak.py): 25 s of mixed locust traffic from 32 users against a
server of its own; no request may fail, no worker may restart and no worker's memory may grow beyond
the soak's tolerance. The recorded 60 s run and its numbers are in loadtest/README.md."""
from __future__ import annotations

import json

import pytest

from loadtest import soak

from .support import MODELS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DURATION_S = 25.0  # two non-overlapping 10 s RSS windows, and a short CI run


def test_short_soak_has_no_failures_restarts_or_memory_growth(start_server, tmp_path):
    server = start_server("soak")
    config = soak.SoakConfig(duration=DURATION_S, users=32, models=MODELS, out_dir=tmp_path, name="soak-short")
    try:
        result = soak.run_soak(config, server)
    finally:
        server.stop()  # free its workers now rather than at the end of the session
    print("\n" + soak.summary(result))

    saved = json.loads((tmp_path / "soak-short.json").read_text())
    assert saved["totals"] == result["totals"]
    assert (tmp_path / "soak-short.png").read_bytes().startswith(b"\x89PNG")
    assert result["totals"]["requests"] > 0 and result["history"][-1]["requests"] > 0
    assert result["totals"]["failures"] == 0, result["failures"]
    assert result["workers_restarted"] == []
    assert set(result["rss"]) == set(MODELS)
    for name, rss in result["rss"].items():
        assert rss["last_mb"] <= rss["first_mb"] * soak.RSS_FACTOR + soak.RSS_SLACK_MB, (name, rss)
    assert result["passed"]
