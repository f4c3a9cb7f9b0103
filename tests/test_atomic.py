"""tlpipe.atomic: temp name in the same folder + os.replace, ordinary permissions, no leftovers."""

import os
import stat

import pytest

from tlpipe import atomic


@pytest.fixture
def umask():
    """os.umask for one test; the old mask is put back afterwards."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_bytes_and_text_write_the_content_and_leave_no_temp_file(tmp_path):
    assert atomic.write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01") == tmp_path / "sub" / "a.bin"
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    atomic.write_text(tmp_path / "b.csv", "x,é\r\ny\n", fsync=True)
    assert (tmp_path / "b.csv").read_bytes() == "x,é\r\ny\n".encode("utf-8")  # newlines as given
    atomic.write_bytes(tmp_path / "b.csv", b"new")  # replaces an existing file
    assert (tmp_path / "b.csv").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.csv", "sub"]


def test_target_gives_a_hidden_temp_name_in_the_same_folder(tmp_path):
    with atomic.target(tmp_path / "m.keras", suffix=".keras") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".m.keras.") and tmp.name.endswith(".tmp.keras")
        tmp.write_bytes(b"model")
        assert not (tmp_path / "m.keras").exists()  # nothing at the final name until the writer finishes
    assert (tmp_path / "m.keras").read_bytes() == b"model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_writer_that_fails_mid_way_leaves_the_old_file_and_no_temp(tmp_path, exc):
    out = tmp_path / "report.png"
    out.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic.target(out) as tmp, open(tmp, "wb") as f:
            f.write(b"half of the new")
            raise exc
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_a_killed_writer_never_leaves_a_file_at_the_final_path(tmp_path):
    out = tmp_path / "new.h5"
    with pytest.raises(RuntimeError):
        with atomic.target(out) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_a_plain_open_would_give(tmp_path, umask, mask, want):
    umask(mask)
    atomic.write_bytes(tmp_path / "a.png", b"x")
    with atomic.target(tmp_path / "b.h5") as tmp:
        tmp.write_bytes(b"y")
    (tmp_path / "plain").write_bytes(b"z")
    assert mode(tmp_path / "a.png") == mode(tmp_path / "b.h5") == mode(tmp_path / "plain") == want
    assert os.umask(mask) == mask  # reading the umask put it back


def test_folder_swaps_a_folder_in_with_ordinary_permissions(tmp_path, umask):
    umask(0o022)
    dest = tmp_path / "img"
    dest.mkdir()
    (dest / "stale.png").write_bytes(b"old")
    (tmp_path / ".img.tmp-killed").mkdir()  # a killed run's temp folder
    with atomic.folder(dest, fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".img.")
        atomic.write_bytes(tmp / "new.png", b"new")
    assert [p.name for p in dest.iterdir()] == ["new.png"]
    assert mode(dest) == 0o755 and mode(dest / "new.png") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["img"]  # no temp or old folder left


def test_folder_keeps_the_old_one_on_error_and_a_shared_one_finished_first(tmp_path):
    dest = tmp_path / "x"
    dest.mkdir()
    (dest / "old").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic.folder(dest) as tmp:
        (tmp / "new").write_bytes(b"new")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and [p.name for p in dest.iterdir()] == ["old"]
    with atomic.folder(dest, shared=True) as tmp:  # another process finished `dest` first: its folder stays
        (tmp / "mine").write_bytes(b"mine")
    assert [p.name for p in dest.iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_every_csv_has_one_format(tmp_path):
    """Manifests, evaluation tables and predictions: "\n" line ends, quotes only where needed, UTF-8
    (the manifests are DVC outputs: a changed byte reruns every later stage)."""
    rows = [["cat/a,b.jpg", 'say "hi"', 0], ["NA/é.png", "", 1.5]]
    text = atomic.csv_text(["path", "note", "n"], rows)
    assert text == 'path,note,n\n"cat/a,b.jpg","say ""hi""",0\nNA/é.png,,1.5\n'
    out = atomic.write_csv(tmp_path / "m.csv", ["path", "note", "n"], rows)
    assert out.read_bytes() == text.encode("utf-8")
