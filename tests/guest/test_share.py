"""Filesystem checks inside one booted guest, verified again from the host side."""
from __future__ import annotations

import calendar
import hashlib
import os
import pathlib
import stat

import pytest

pytestmark = pytest.mark.guest

SIZES = [1, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1, 64 << 20]


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def parse_sums(output: str) -> dict[str, str]:
    """``sha256sum`` lines -> {name: hex}."""
    sums = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1]] = parts[0]
    return sums


def test_guest_writes_all_sizes_host_reads_same_bytes(guest):
    host = guest.workdir("sizes")
    script = "mkdir sizes && cd sizes\n"
    for n in SIZES:
        script += f"head -c {n} /dev/urandom > f{n}\n"
    script += "sha256sum f*\n"
    out = guest.sh(script)
    # Read back from the backend, not the page cache.
    again = guest.sh("sync; echo 3 > /proc/sys/vm/drop_caches; cd sizes && sha256sum f*")
    written, reread = parse_sums(out), parse_sums(again)
    assert set(written) == {f"f{n}" for n in SIZES}
    assert written == reread
    for n in SIZES:
        path = host / f"f{n}"
        assert path.stat().st_size == n
        assert sha256_file(path) == written[f"f{n}"], f"f{n}: host bytes differ from the guest's"


def test_host_writes_all_sizes_guest_reads_same_bytes(guest):
    host = guest.workdir("hostsizes")
    host.mkdir()
    expected = {}
    for n in SIZES:
        data = os.urandom(n)
        (host / f"h{n}").write_bytes(data)
        expected[f"h{n}"] = hashlib.sha256(data).hexdigest()
    out = guest.sh("cd hostsizes && sha256sum h* && stat -c '%n %s' h*")
    assert parse_sums(out) == expected
    sizes = dict(line.split() for line in out.splitlines() if line.startswith("h") and len(line.split()) == 2)
    assert {k: int(v) for k, v in sizes.items()} == {f"h{n}": n for n in SIZES}


def test_create_and_list_1000_files(guest):
    host = guest.workdir("many")
    out = guest.sh(
        "mkdir many && cd many\n"
        "for i in $(seq 0 999); do echo \"file $i\" > f$i; done\n"
        "ls | wc -l\n"
        "ls -1 > /tmp/names && wc -l < /tmp/names && cat /tmp/names | sed -n '1p;$p'\n"
        "cat f0 f999\n")
    lines = out.split()
    assert lines[0] == "1000" and lines[1] == "1000"
    assert "file 0\nfile 999\n" in out
    names = sorted(os.listdir(host))
    assert names == sorted(f"f{i}" for i in range(1000))
    for i in (0, 1, 500, 999):
        assert (host / f"f{i}").read_text() == f"file {i}\n"
    # The guest's listing matches the host's.
    listing = guest.sh("ls -1 many").split()
    assert sorted(listing) == names


def test_renames(guest):
    host = guest.workdir("ren")
    guest.sh(
        "mkdir -p ren/d1 ren/d2 && cd ren\n"
        "echo a > a && mv a a2\n"                       # file rename
        "echo x > d1/x && mv d1 d1b\n"                  # directory rename
        "echo c > d1b/c && mv d1b/c d2/c\n"             # cross-directory
        "echo new > src && echo old > dst && mv -f src dst\n"  # overwrite
        "test ! -e a && test -f a2 && test -d d1b && test ! -e d1 && test -f d2/c\n"
        "test \"$(cat dst)\" = new && test ! -e src\n")
    assert sorted(os.listdir(host)) == ["a2", "d1b", "d2", "dst"]
    assert (host / "a2").read_text() == "a\n"
    assert (host / "d1b" / "x").read_text() == "x\n"
    assert os.listdir(host / "d1b") == ["x"]
    assert (host / "d2" / "c").read_text() == "c\n"
    assert (host / "dst").read_text() == "new\n"


def test_hard_link(guest):
    host = guest.workdir("hl")
    out = guest.sh("mkdir hl && cd hl && echo data > a && ln a b && stat -c '%h %i' a b && cat b")
    (na, ia), (nb, ib) = (line.split() for line in out.splitlines()[:2])
    assert na == nb == "2" and ia == ib
    sa, sb = (host / "a").stat(), (host / "b").stat()
    assert sa.st_nlink == sb.st_nlink == 2
    assert (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)
    guest.sh("rm hl/a && test \"$(stat -c %h hl/b)\" = 1 && cat hl/b")
    assert not (host / "a").exists() and (host / "b").stat().st_nlink == 1


def test_symbolic_link(guest):
    host = guest.workdir("sl")
    out = guest.sh("mkdir sl && cd sl && echo t > target && ln -s target l && ln -s ../nowhere dangling"
                   " && readlink l && readlink dangling && cat l")
    assert out.splitlines() == ["target", "../nowhere", "t"]
    assert os.readlink(host / "l") == "target"
    assert os.readlink(host / "dangling") == "../nowhere"
    assert stat.S_ISLNK(os.lstat(host / "l").st_mode)


def test_chmod_chown_truncate_utimes(guest):
    host = guest.workdir("attr")
    out = guest.sh(
        "mkdir attr && cd attr && head -c 100000 /dev/urandom > f && mkdir d\n"
        "chmod 640 f && chmod 1750 d\n"
        "chown 1234:5678 f\n"
        "truncate -s 12345 f\n"
        "touch -d '2001-02-03 04:05:06' f\n"
        "stat -c '%a %u %g %s %Y' f d\n"
        "truncate -s 70000 f && stat -c %s f && truncate -s 0 f && truncate -s 5000 f\n"
        "sha256sum f\n")
    lines = out.splitlines()
    assert lines[0] == "640 1234 5678 12345 981173106"
    assert lines[1].split()[0] == "1750"
    assert lines[2] == "70000"
    st = (host / "f").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_size == 5000
    assert st.st_mtime_ns // 10**9 != calendar.timegm((2001, 2, 3, 4, 5, 6))  # truncate updated it
    assert stat.S_IMODE((host / "d").stat().st_mode) == 0o1750
    assert (host / "f").read_bytes() == b"\0" * 5000  # truncated to 0, extended with zeros
    assert parse_sums(out)["f"] == hashlib.sha256(b"\0" * 5000).hexdigest()
    # utimes alone, checked on the host to the second.
    guest.sh("touch -d '2001-02-03 04:05:06' attr/f")
    st = (host / "f").stat()
    assert st.st_mtime == st.st_atime == calendar.timegm((2001, 2, 3, 4, 5, 6))


def test_rmdir_non_empty_fails_with_enotempty(guest):
    host = guest.workdir("rmd")
    res = guest.run("mkdir -p rmd/full/sub rmd/empty && echo x > rmd/full/f && rmdir rmd/full 2>&1")
    assert res.status != 0
    assert "Directory not empty" in res.output
    assert (host / "full" / "f").exists() and (host / "full" / "sub").is_dir()
    guest.sh("rmdir rmd/empty && test ! -e rmd/empty")
    assert not (host / "empty").exists()


def test_unlink(guest):
    host = guest.workdir("unl")
    guest.sh("mkdir unl && echo a > unl/a && echo b > unl/b && rm unl/a && unlink unl/b && test ! -e unl/a"
             " && test -z \"$(ls unl)\"")
    assert os.listdir(host) == []
    res = guest.run("rm unl/missing 2>&1")
    assert res.status != 0 and "No such file or directory" in res.output


def test_host_changes_are_seen_by_the_guest(guest):
    host = guest.workdir("fromhost")
    (host / "sub").mkdir(parents=True)
    (host / "sub" / "file").write_bytes(b"from the host\n")
    os.symlink("sub/file", host / "link")
    os.chmod(host / "sub" / "file", 0o604)
    out = guest.sh("cd fromhost && cat link && stat -c '%a %s' sub/file && readlink link")
    assert out.splitlines() == ["from the host", "604 14", "sub/file"]
