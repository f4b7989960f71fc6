"""The rate-limited report of failed cache writes, on a fake clock."""

from __future__ import annotations

import errno
import logging

import pytest

from erllama.cache.faults import WriteFailures

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def failures(caplog: pytest.LogCaptureFixture) -> WriteFailures:
    caplog.set_level(logging.ERROR, logger="test.faults")
    return WriteFailures(logging.getLogger("test.faults"), interval_s=60.0)


def test_the_first_failure_is_logged_with_its_cause_and_traceback(
    failures: WriteFailures, caplog: pytest.LogCaptureFixture
) -> None:
    failures.note(ENOSPC, "save of row ab to disk", now=0.0)
    (rec,) = caplog.records
    assert "save of row ab to disk" in rec.getMessage()
    assert "OSError: [Errno 28] No space left on device" in rec.getMessage()
    assert rec.exc_info is not None and rec.exc_info[1] is ENOSPC


def test_later_failures_wait_for_the_interval_then_come_in_one_line(
    failures: WriteFailures, caplog: pytest.LogCaptureFixture
) -> None:
    failures.note(ENOSPC, "a", now=0.0)
    for t in range(1, 60):
        failures.note(OSError(errno.EIO, "I/O error"), "b", now=float(t))
    assert len(caplog.records) == 1
    failures.note(ENOSPC, "c", now=60.0)
    assert len(caplog.records) == 2
    summary = caplog.records[1]
    assert summary.getMessage() == (
        "60 more cache writes failed (last: OSError: [Errno 28] No space left on device)"
    )
    assert summary.exc_info is None
    failures.note(ENOSPC, "d", now=61.0)  # the interval starts again from the summary
    assert len(caplog.records) == 2


def test_flush_reports_what_is_pending_and_nothing_else(
    failures: WriteFailures, caplog: pytest.LogCaptureFixture
) -> None:
    failures.flush(now=0.0)
    assert caplog.records == []
    failures.note(ENOSPC, "a", now=0.0)
    failures.note(ENOSPC, "b", now=1.0)
    failures.flush(now=2.0)
    failures.flush(now=3.0)
    assert [r.getMessage().split(" (")[0] for r in caplog.records[1:]] == [
        "1 more cache writes failed"
    ]
