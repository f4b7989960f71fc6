"""Records beside the rows (erllama.cache.records): published whole or not at all, checked
on every read, bounded, and shared by every store over the same directories."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from erllama.cache.records import RecordStore, decode, encode


def store(tmp_path: Path, max_records: int = 100) -> RecordStore:
    return RecordStore([tmp_path / "shm", tmp_path / "disk"], "replies", max_records)


def files(tmp_path: Path, tier: str) -> list[Path]:
    return sorted((tmp_path / tier / "records" / "replies").iterdir())


def test_a_record_reads_back_from_another_store_over_the_same_directories(
    tmp_path: Path,
) -> None:
    store(tmp_path).put(b"key", b"value")
    assert store(tmp_path).get(b"key") == b"value"
    assert store(tmp_path).get(b"other") is None
    assert [len(files(tmp_path, t)) for t in ("shm", "disk")] == [1, 1]
    for f in files(tmp_path, "disk"):
        assert f.stat().st_mode & 0o777 == 0o600
    # Records hold replies' text: every folder made for them is 0700.
    for d in (tmp_path / "disk", tmp_path / "disk" / "records", files(tmp_path, "disk")[0].parent):
        assert d.stat().st_mode & 0o777 == 0o700, d


def test_a_newer_record_replaces_the_older(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put(b"key", b"one")
    s.put(b"key", b"two")
    assert s.get(b"key") == b"two"
    assert len(files(tmp_path, "disk")) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # torn
        lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]),  # a flipped bit in the value
        lambda raw: b"XXXX" + raw[4:],  # not a record
        lambda raw: b"",
    ],
)
def test_a_damaged_record_reads_as_absent_and_is_removed(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    s = RecordStore([tmp_path / "disk"], "replies", 100)
    s.put(b"key", b"value")
    (path,) = files(tmp_path, "disk")
    path.write_bytes(damage(path.read_bytes()))
    assert s.get(b"key") is None
    assert not path.exists()


def test_the_first_good_copy_is_read(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put(b"key", b"value")
    (shm,) = files(tmp_path, "shm")
    shm.write_bytes(b"garbage")
    assert s.get(b"key") == b"value"  # from the disk, the tmpfs copy removed
    assert not shm.exists()


def test_a_record_of_another_key_under_the_same_name_is_not_taken() -> None:
    raw = encode(b"one", b"value")
    assert decode(raw, b"one") == b"value"
    assert decode(raw, b"two") is None


def test_records_past_the_bound_go_least_recently_written_first(tmp_path: Path) -> None:
    s = RecordStore([tmp_path / "disk"], "replies", 10)
    for i in range(40):
        before = set(files(tmp_path, "disk")) if i else set()
        s.put(b"k%d" % i, b"v")
        # Written one second apart (a filesystem's clock may not tell puts apart).
        (new,) = set(files(tmp_path, "disk")) - before
        os.utime(new, ns=(i * 10**9, i * 10**9))
    s.trim()
    assert len(files(tmp_path, "disk")) == 10
    assert all(s.get(b"k%d" % i) == b"v" for i in range(30, 40))


def test_a_dead_writers_temp_is_swept_and_a_live_one_kept(tmp_path: Path) -> None:
    s = RecordStore([tmp_path / "disk"], "replies", 10)
    s.put(b"key", b"value")
    d = tmp_path / "disk" / "records" / "replies"
    old, new = d / "a.1.x.tmp", d / "b.1.y.tmp"
    old.write_bytes(b"half")
    new.write_bytes(b"half")
    os.utime(old, (0, 0))
    s.trim()
    assert not old.exists() and new.exists()
    assert s.get(b"key") == b"value"


def test_an_unwritable_directory_loses_the_record_without_raising(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file where the directory should be")
    s = RecordStore([blocked, tmp_path / "disk"], "replies", 10)
    s.put(b"key", b"value")
    assert s.get(b"key") == b"value"
