"""FileTier: publish protocol, permissions, symlink safety, scans, and two real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from erllama.cache import tiers as tiers_module
from erllama.cache.format import CorruptRow, encode_row
from erllama.cache.key import Namespace
from erllama.cache.tiers import FileTier
from erllama.errors import CacheError

NS = Namespace(b"\x01" * 32, 1, b"\x02" * 32)
TARGET_TEXT = b"precious, not a cache row"


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[FileTier]:
    with FileTier("disk", tmp_path / "rows") as t:
        yield t


def save(tier: FileTier, tokens: list[int], payload: bytes = b"payload") -> bytes:
    key = NS.key(tokens)
    tmp = tier.write_tmp(key, encode_row(NS, tokens, "finish", payload), payload)
    assert tier.publish(tmp, key) == "published"
    return key


def names(tier: FileTier) -> set[str]:
    return set(os.listdir(tier.directory))


def temps(tier: FileTier) -> list[str]:
    return [n for n in names(tier) if n.endswith(".tmp")]


# -- basics -----------------------------------------------------------------------------------


def test_published_row_reads_back(tier: FileTier) -> None:
    key = save(tier, [1, 2, 3], b"state")
    meta, payload = tier.read(key)
    assert (meta.key, meta.tokens, bytes(payload)) == (key, (1, 2, 3), b"state")
    assert tier.path_for(key).name == f"{key.hex()}.kvc"
    assert tier.size_of(key) == meta.file_size
    assert temps(tier) == []


def test_delete_frees_the_file_size_and_is_idempotent(tier: FileTier) -> None:
    key = save(tier, [1])
    size = tier.size_of(key)
    assert size
    assert tier.delete(key) == size
    assert tier.delete(key) == 0
    assert tier.size_of(key) is None
    with pytest.raises(FileNotFoundError):
        tier.read(key)


def test_a_closed_tier_refuses_work(tmp_path: Path) -> None:
    t = FileTier("disk", tmp_path / "rows")
    with pytest.raises(CacheError, match="not open"):
        t.read(NS.key([1]))


# -- permissions and the directory ------------------------------------------------------------


def test_directories_are_0700_and_files_0600(tmp_path: Path) -> None:
    with FileTier("disk", tmp_path / "a" / "b" / "rows") as t:
        key = NS.key([1])
        tmp = t.write_tmp(key, encode_row(NS, [1], "cold", b"x"), b"x")
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
        t.publish(tmp, key)
        assert stat.S_IMODE(t.path_for(key).stat().st_mode) == 0o600
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "rows"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_an_existing_loose_directory_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "rows"
    d.mkdir(mode=0o755)
    with FileTier("disk", d):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(CacheError, match="symlink"):
        FileTier("disk", tmp_path / "link").open()


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rows").write_bytes(b"")
    with pytest.raises(CacheError, match="not a directory"):
        FileTier("disk", tmp_path / "rows").open()


def test_a_directory_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rows").mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(CacheError, match="owned by"):
        FileTier("disk", tmp_path / "rows").open()


# -- symlinks planted at a row's name ---------------------------------------------------------


@pytest.fixture
def planted(tier: FileTier, tmp_path: Path) -> tuple[bytes, Path]:
    """A symlink at the row name of key [5, 6] pointing at a file outside the tier."""
    target = tmp_path / "target"
    target.write_bytes(TARGET_TEXT)
    key = NS.key([5, 6])
    tier.path_for(key).symlink_to(target)
    return key, target


def test_a_planted_symlink_is_read_as_corrupt_and_removed(
    tier: FileTier, planted: tuple[bytes, Path]
) -> None:
    key, target = planted
    with pytest.raises(CorruptRow):
        tier.read(key)
    assert not os.path.lexists(tier.path_for(key))
    assert target.read_bytes() == TARGET_TEXT


def test_publish_replaces_a_planted_symlink_without_touching_its_target(
    tier: FileTier, planted: tuple[bytes, Path]
) -> None:
    key, target = planted
    tmp = tier.write_tmp(key, encode_row(NS, [5, 6], "cold", b"p"), b"p")
    assert tier.publish(tmp, key) == "replaced"
    assert not tier.path_for(key).is_symlink()
    assert bytes(tier.read(key)[1]) == b"p"
    assert target.read_bytes() == TARGET_TEXT


def test_touch_hits_does_not_write_through_a_symlink(
    tier: FileTier, planted: tuple[bytes, Path]
) -> None:
    key, target = planted
    assert tier.touch_hits(key, 99) is False
    assert target.read_bytes() == TARGET_TEXT


def test_scan_removes_a_planted_symlink(tier: FileTier, planted: tuple[bytes, Path]) -> None:
    key, target = planted
    assert tier.scan(3600) == ([], 1)
    assert not os.path.lexists(tier.path_for(key))
    assert target.read_bytes() == TARGET_TEXT


# -- the publish protocol ---------------------------------------------------------------------


def test_publish_adopts_a_valid_existing_row(tier: FileTier) -> None:
    key = save(tier, [1, 2], b"first")
    tmp = tier.write_tmp(key, encode_row(NS, [1, 2], "finish", b"second"), b"second")
    assert tier.publish(tmp, key) == "adopted"
    assert bytes(tier.read(key)[1]) == b"first"
    assert temps(tier) == []


def test_publish_replaces_a_corrupt_existing_row(tier: FileTier) -> None:
    key = NS.key([1, 2])
    tier.path_for(key).write_bytes(b"torn garbage")
    tmp = tier.write_tmp(key, encode_row(NS, [1, 2], "finish", b"good"), b"good")
    assert tier.publish(tmp, key) == "replaced"
    assert bytes(tier.read(key)[1]) == b"good"
    assert temps(tier) == []


def test_publishing_a_bad_temp_raises_and_leaves_nothing(tier: FileTier) -> None:
    key = NS.key([1, 2])
    # A prefix describing other tokens: the row's recomputed key will not match.
    tmp = tier.write_tmp(key, encode_row(NS, [9], "finish", b"x"), b"x")
    with pytest.raises(CorruptRow, match="key"):
        tier.publish(tmp, key)
    assert names(tier) == set()


def test_abort_tmp_removes_the_temp(tier: FileTier) -> None:
    key = NS.key([1])
    tmp = tier.write_tmp(key, encode_row(NS, [1], "cold", b"x"), b"x")
    tier.abort_tmp(tmp)
    tier.abort_tmp(tmp)
    assert names(tier) == set()


def test_a_failed_write_leaves_no_temp(tier: FileTier) -> None:
    with pytest.raises(TypeError):
        tier.write_tmp(NS.key([1]), b"prefix", "not a buffer")  # type: ignore[arg-type]
    assert names(tier) == set()


def test_publish_refuses_a_temp_of_another_key(tier: FileTier) -> None:
    tmp = tier.write_tmp(NS.key([1]), encode_row(NS, [1], "cold", b"x"), b"x")
    with pytest.raises(ValueError, match="temp"):
        tier.publish(tmp, NS.key([2]))


# -- reads, hits, scans -----------------------------------------------------------------------


def test_a_damaged_row_is_removed_when_read(tier: FileTier) -> None:
    key = save(tier, [1, 2], b"payload")
    path = tier.path_for(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(CorruptRow, match="payload checksum"):
        tier.read(key)
    assert not path.exists()


def test_touch_hits_persists_and_keeps_the_row_valid(tier: FileTier) -> None:
    key = save(tier, [1, 2])
    assert tier.touch_hits(key, 17)
    assert tier.read(key)[0].hits == 17
    assert [m.hits for m in tier.scan(3600)[0]] == [17]
    assert tier.touch_hits(NS.key([3]), 1) is False


def test_scan_keeps_valid_rows_and_removes_stale_temps_and_corrupt_files(
    tier: FileTier,
) -> None:
    good = {save(tier, [i, i]) for i in range(3)}
    d = tier.directory
    stale = d / f"{NS.key([7]).hex()}.kvc.1.aa.tmp"
    fresh = d / f"{NS.key([8]).hex()}.kvc.1.bb.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    truncated = tier.path_for(NS.key([4, 4]))
    truncated.write_bytes(tier.path_for(next(iter(good))).read_bytes()[:-1])
    misnamed = d / "NOT-A-KEY.kvc"
    misnamed.write_bytes(b"")
    # A row file stored under another key's name.
    wrong_name = tier.path_for(NS.key([5, 5]))
    wrong_name.write_bytes(tier.path_for(next(iter(good))).read_bytes())
    unrelated = d / "README"
    unrelated.write_bytes(b"left alone")

    metas, corrupt = tier.scan(stale_tmp_age_s=60)

    assert {m.key for m in metas} == good
    assert corrupt == 3
    assert names(tier) == {f"{k.hex()}.kvc" for k in good} | {fresh.name, "README"}


def test_scan_with_age_zero_removes_every_temp(tier: FileTier) -> None:
    (tier.directory / "x.kvc.1.a.tmp").write_bytes(b"")
    tier.scan(0)
    assert temps(tier) == []


def test_sweep_tmps_removes_only_old_temps(tier: FileTier) -> None:
    d = tier.directory
    (d / "old.tmp").write_bytes(b"")
    (d / "new.tmp").write_bytes(b"")
    old = time.time() - 100
    os.utime(d / "old.tmp", (old, old))
    assert tier.sweep_tmps(50) == 1
    assert temps(tier) == ["new.tmp"]


def test_scan_leaves_payload_checks_to_read(tier: FileTier) -> None:
    key = save(tier, [1, 2], b"payload")
    path = tier.path_for(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(data)
    assert [m.key for m in tier.scan(3600)[0]] == [key]  # meta parse only: cheap at start-up
    with pytest.raises(CorruptRow):
        tier.read(key)  # every read checks the payload before serving it


def test_scan_tolerates_rows_vanishing_meanwhile(
    tier: FileTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone, kept = save(tier, [1]), save(tier, [2])
    real_open_row = tiers_module.open_row  # type: ignore[attr-defined]

    def racing_open_row(name: str, *, dir_fd: int) -> object:
        if name == tier.path_for(gone).name:
            os.unlink(name, dir_fd=dir_fd)  # another process evicts it right now
        return real_open_row(name, dir_fd=dir_fd)

    monkeypatch.setattr(tiers_module, "open_row", racing_open_row)
    metas, corrupt = tier.scan(3600)
    assert ([m.key for m in metas], corrupt) == ([kept], 0)


def test_a_directory_planted_at_a_row_name_fails_publish_cleanly(tier: FileTier) -> None:
    key = NS.key([3])
    tier.path_for(key).mkdir()
    with pytest.raises(CorruptRow):
        tier.read(key)
    tmp = tier.write_tmp(key, encode_row(NS, [3], "cold", b"x"), b"x")
    with pytest.raises(CacheError, match="kept changing"):
        tier.publish(tmp, key)
    assert temps(tier) == []
    assert tier.delete(key) == 0


# -- two processes ----------------------------------------------------------------------------

RACER = textwrap.dedent(
    """
    import collections, json, sys
    from erllama.cache.format import encode_row
    from erllama.cache.key import Namespace
    from erllama.cache.tiers import FileTier

    ns = Namespace(b"\\x01" * 32, 1, b"\\x02" * 32)
    tier = FileTier("disk", sys.argv[1])
    tier.open()
    print("ready", flush=True)
    sys.stdin.readline()
    outcomes = collections.Counter()
    for i in range(int(sys.argv[2])):
        tokens = [i, i + 1, i + 2]
        key = ns.key(tokens)
        payload = bytes([i % 256]) * (64 * 1024)
        tmp = tier.write_tmp(key, encode_row(ns, tokens, "finish", payload), payload)
        outcomes[tier.publish(tmp, key)] += 1
    print(json.dumps(outcomes), flush=True)
    """
)


def test_two_processes_publishing_the_same_keys_end_with_one_valid_row_each(
    tmp_path: Path,
) -> None:
    n = 150
    d = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(d), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline() != b"ready\n":
            p.kill()
            pytest.fail(p.communicate()[1].decode())
    for p in procs:  # release both at once
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out))

    total = {o: sum(r.get(o, 0) for r in results) for o in ("published", "adopted", "replaced")}
    # Exactly one process links each key; the other finds it, validates it and adopts it.
    assert total == {"published": n, "adopted": n, "replaced": 0}
    with FileTier("disk", d) as t:
        metas, corrupt = t.scan(0)
        assert (len(metas), corrupt) == (n, 0)
        for m in metas:
            t.read(m.key)
        assert temps(t) == []


def test_scan_unknown_skips_known_rows(tier: FileTier) -> None:
    known = save(tier, [1])
    other = save(tier, [2])
    tier.path_for(known).write_bytes(b"damaged, but known: not re-read here")
    metas, corrupt = tier.scan_unknown({known}, 3600)
    assert ([m.key for m in metas], corrupt) == ([other], 0)


def test_row_keys_lists_names_like_rows_and_nothing_else(tier: FileTier) -> None:
    a, b = save(tier, [1]), save(tier, [2])
    (tier.directory / "notes.kvc").write_text("not a row name")
    (tier.directory / f"{a.hex()}.kvc.1.ab.tmp").write_text("a temp")
    assert tier.row_keys() == {a, b}
