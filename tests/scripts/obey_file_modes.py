"""Run pytest in a process that obeys file modes though it runs as root.

    python obey_file_modes.py PYTEST_ARGS...

Root reads and writes files whatever their mode because it holds CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH. This drops both (from the effective, permitted and inheritable sets,
so nothing in the process can take them back), then runs ``pytest PYTEST_ARGS``: a test
about unreadable files then sees them unreadable, as an ordinary user would, while the
interpreter and the source tree (which may live where only root may look) stay readable.

Capabilities belong to threads, and a thread starts with its creator's: they are dropped
here, in the main thread, before anything has started another. Dropping needs no
privilege. Linux only. Exits with pytest's status; with 90 when the capabilities could not
be dropped.
"""

from __future__ import annotations

import ctypes
import os
import sys

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
#: Set in the environment of the pytest run, for the test to know where it is.
MARK = "ERLLAMA_TESTS_OBEY_FILE_MODES"


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_file_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


if __name__ == "__main__":
    try:
        drop_file_capabilities()
    except (OSError, AttributeError) as exc:  # AttributeError: no capget in this libc
        print(f"could not drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: {exc}", file=sys.stderr)
        sys.exit(90)
    os.environ[MARK] = "1"
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
