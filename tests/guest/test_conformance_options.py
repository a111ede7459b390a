"""The conformance suite under other daemon options, in booted guests.

* ``--writeback --cache always --no-readdirplus``: the data-path items (appends from two
  writers, shared mmap, sparse files, punch hole, copy_file_range, timestamps, unlink
  while open, 3,000 entries listed by plain READDIR) with the guest page cache in
  writeback mode.
* ``--readonly --cache never``: every change refused with EROFS, reads still served,
  data never cached (a host change is seen at once).

Backend as in test_conformance.py (``VHOSTFS_CONFORMANCE_BACKEND``).
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from test_conformance import BACKEND, REFERENCE, _build, _run_suite, prepare_entries
from vhostfs.guestrun import GuestRunner

pytestmark = pytest.mark.guest

DATA_TESTS = ["append_two_writers", "mmap_shared", "sparse_seek", "fallocate", "copy_file_range",
              "timestamps", "unlink_open", "rename_exchange", "readdir_10000", "fcntl_locks", "flock"]


def _backend(opts: str) -> str:
    if BACKEND == "reference":
        return f"{REFERENCE} --socket-path {{socket}} --shared-dir {{shared_dir}} --sandbox none {opts}"
    return (f"{sys.executable} -m vhostfs --socket-path {{socket}} --shared-dir {{shared_dir}}"
            f" --log-level {{log_level}} {opts}")


def _runner(share, opts: str) -> GuestRunner:
    return GuestRunner(share, backend=_backend(opts), kernel=os.environ.get("VHOSTFS_GUEST_KERNEL"),
                       boot_timeout=180, timeout=600)


@pytest.fixture(scope="module")
def writeback_results(tmp_path_factory):
    share = tmp_path_factory.mktemp("cf-writeback")
    os.chmod(share, 0o755)
    (share / "work").mkdir()
    _build(share / "conformance")
    prepare_entries(share / "work" / "readdir10k", 3000)
    with _runner(share, "--writeback --cache always --no-readdirplus").session() as sess:
        res = sess.run("cp /mnt/conformance /tmp/cf", timeout=60)
        assert res.status == 0, res.output
        yield _run_suite(sess, "--entries 3000 /mnt/work " + " ".join(DATA_TESTS))


@pytest.mark.parametrize("name", DATA_TESTS)
def test_writeback_cache_always(writeback_results, name):
    status, detail = writeback_results.get(name, ("missing", "did not report"))
    assert status == "ok", f"{name}: {detail}"


def test_readonly_cache_never(tmp_path_factory):
    share = tmp_path_factory.mktemp("cf-readonly")
    os.chmod(share, 0o755)
    (share / "f").write_text("before\n")
    (share / "d").mkdir()
    with _runner(share, "--readonly --cache never").session() as sess:
        out = sess.run(
            "cat /mnt/f; "
            "for op in 'touch /mnt/new' 'mkdir /mnt/nd' 'rm /mnt/f' 'mv /mnt/f /mnt/g' "
            "'ln -s x /mnt/l' 'chmod 600 /mnt/f' 'rmdir /mnt/d'; do "
            "  if $op 2>/tmp/err; then echo \"ALLOWED: $op\"; else echo \"refused: $op: $(cat /tmp/err)\"; fi; "
            "done; "
            "(echo x >> /mnt/f) 2>/tmp/err && echo 'ALLOWED: append' || echo \"refused: append: $(cat /tmp/err)\"",
            timeout=120).output
        assert "before" in out
        assert "ALLOWED" not in out, out
        assert out.count("refused:") == 8 and out.count("Read-only file system") == 8, out
        # cache=never: a host-side change is visible to the very next read
        (share / "f").write_text("after\n")
        again = sess.run("cat /mnt/f", timeout=60).output
        assert "after" in again and "before" not in again, again
    assert (share / "f").read_text() == "after\n"
    assert sorted(p.name for p in share.iterdir()) == ["d", "f"]
