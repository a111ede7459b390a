"""Hypothesis: sequences of map / upgrade / unmap (batched) / reuse / forget / host growth /
reset against the faithful simulated front end never leave an overlapping, misaligned or
leaked mapping, never break a front-end rule, and every byte the guest may read through the
window equals the file's."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.support.dax_frontend import DaxRig

MiB = 1 << 20
R = 2 * MiB
WINDOW_RANGES = 6
SIZES = [1, 4096, R - 1, R, R + 1, 3 * R + 5000]


class DaxSequences(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="dax-prop-"))
        self.rig = DaxRig(self.tmp, window=WINDOW_RANGES * R)
        self.nodes = {}
        for i, size in enumerate(SIZES):
            self.nodes[i] = self.rig.create(f"f{i}", bytes([i + 1]) * size)
        self.guest = {}              # moffset -> (file index, foffset, writable): what the guest believes
        self.stale = {}              # moffset -> file index: REMOVEMAPPING failed, still mapped here

    def teardown(self):
        try:
            self.rig.check()
        finally:
            self.rig.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _size(self, i):
        return os.path.getsize(self.rig.share / f"f{i}")

    @rule(slot=st.integers(0, WINDOW_RANGES - 1), i=st.integers(0, len(SIZES) - 1),
          chunk=st.integers(0, 3), write=st.booleans())
    def setup(self, slot, i, chunk, write):
        moffset, foffset = slot * R, chunk * R
        try:
            self.rig.setup(self.nodes[i], foffset, moffset, write=write)
        except OSError as exc:
            assert foffset >= self._size(i) and exc.errno == errno.EINVAL, exc
            # a refused SETUPMAPPING leaves an earlier mapping of the range untouched
            return
        self.guest[moffset] = (i, foffset, write)
        self.stale.pop(moffset, None)

    @rule(slot=st.integers(0, WINDOW_RANGES - 1))
    def upgrade(self, slot):
        if slot * R not in self.guest:
            return
        i, foffset, _ = self.guest[slot * R]
        self.rig.setup(self.nodes[i], foffset, slot * R, write=True)
        self.guest[slot * R] = (i, foffset, True)

    @rule(slots=st.lists(st.integers(0, WINDOW_RANGES - 1), min_size=1, max_size=WINDOW_RANGES, unique=True))
    def remove(self, slots):
        entries = [(s * R, R) for s in slots if s * R not in self.stale]   # the guest thinks those free
        if not entries:
            return
        expect_error = any(m not in self.guest for m, _ in entries)
        try:
            self.rig.remove(*entries)
            assert not expect_error
        except OSError as exc:
            assert expect_error and exc.errno == errno.ENOENT, exc
        for m, _ in entries:
            self.guest.pop(m, None)

    @rule(slot=st.integers(0, WINDOW_RANGES - 1))
    def failed_remove(self, slot):
        """A REMOVEMAPPING the back end refuses; the guest frees the range anyway."""
        try:
            self.rig.remove((slot * R, 4096))
            raise AssertionError("a partial REMOVEMAPPING was accepted")
        except OSError as exc:
            assert exc.errno in (errno.EINVAL, errno.ENOENT)
        if slot * R in self.guest:
            self.stale[slot * R] = self.guest.pop(slot * R)[0]

    @rule(i=st.integers(0, len(SIZES) - 1), grow=st.integers(1, 9000))
    def host_appends(self, i, grow):
        with open(self.rig.share / f"f{i}", "ab") as f:
            f.write(bytes([0x80 + i]) * grow)
        self.rig.fs.getattr(self.rig.ctx(), self.nodes[i], None)   # the guest learns the size

    @rule(i=st.integers(0, len(SIZES) - 1))
    def forget_and_lookup_again(self, i):
        self.rig.fs.forget(self.nodes[i], 1)
        for m in [m for m, v in self.guest.items() if v[0] == i]:
            del self.guest[m]
        for m in [m for m, v in self.stale.items() if v == i]:
            del self.stale[m]
        self.nodes[i] = self.rig.fs.lookup(self.rig.ctx(), 1, f"f{i}".encode()).nodeid

    @rule()
    def reset(self):
        self.rig.fe.reset_device()
        deadline = time.monotonic() + 5
        while len(self.rig.manager.window) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.guest.clear()
        self.stale.clear()
        self.rig.start()

    @invariant()
    def consistent(self):
        self.rig.check()
        assert {m.moffset for m in self.rig.manager.window.mappings()} == set(self.guest) | set(self.stale)
        for moffset, (i, foffset, writable) in self.guest.items():
            data = (self.rig.share / f"f{i}").read_bytes()[foffset:foffset + R]
            assert self.rig.fe.window.read(moffset, len(data)) == data
            mapping = self.rig.manager.window.get(moffset)
            assert mapping.writable == writable and mapping.foffset == foffset


DaxSequences.TestCase.settings = settings(
    max_examples=int(os.environ.get("DAX_PROP_EXAMPLES", "25")), stateful_step_count=25,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_dax_sequences = DaxSequences.TestCase
