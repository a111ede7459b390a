"""The DAX cache window as pure bookkeeping: what each 2 MiB range holds.  No I/O.

The guest (Linux 6.1 fs/fuse/dax.c) splits the window into 2 MiB ranges and asks for one
range at a time: SETUPMAPPING with ``moffset``/``foffset`` multiples of 2 MiB and ``len``
2 MiB, READ or READ|WRITE, a second SETUPMAPPING at the same ``moffset`` to upgrade, and
REMOVEMAPPING entries for whole ranges (../shared/design/dax.md §1.4).  We answer INIT with
``map_alignment`` = 21, so every offset here must be a multiple of 2 MiB.

A range is backed in the front end by one or two *pieces* (one SHMEM_MAP each, unmapped
exactly, dax.md §2.4):

* the file itself for the whole pages that exist, ``[foffset, page_floor(size))`` clipped
  to the range, because QEMU 11.1 refuses to map past the end of the fd;
* when the file ends inside the range on a partial page, a one-page *shadow* (a memfd
  holding a copy of that page) right after it.  The rest of the range, past the end of
  the file, is left unmapped: the guest never touches it (``fuse_fill_iomap`` clips to
  ``i_size``, rounded up to a page for faults).

``plan_pieces`` computes that layout; ``Window`` validates guest requests and records
mappings.  Every method raises :class:`WindowError` (an ``OSError`` with the errno the
guest gets) for a bad request and never changes state on failure.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

RANGE_SHIFT = 21
RANGE_SIZE = 1 << RANGE_SHIFT            # FUSE_DAX_SZ
PAGE_SIZE = 4096
MAP_ALIGNMENT = RANGE_SHIFT              # log2, what INIT reports (6.1 accepts <= 21)
FLAG_WRITE = 1 << 0                      # FUSE_SETUPMAPPING_FLAG_WRITE
FLAG_READ = 1 << 1                       # FUSE_SETUPMAPPING_FLAG_READ
KNOWN_FLAGS = FLAG_WRITE | FLAG_READ
NO_HANDLE = (1 << 64) - 1                # the guest's fh = -1
MAX_REMOVE_ENTRIES = 256                 # FUSE_REMOVEMAPPING_MAX_ENTRY on 4 KiB pages
MAX_FILE_OFFSET = (1 << 63) - 1


class WindowError(OSError):
    """A guest request the window refuses; ``errno`` is what the guest gets."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(frozen=True, slots=True)
class Piece:
    """One front-end mapping: ``length`` bytes at window offset ``shm_offset``.

    ``fd_offset`` is the offset in the file (or, for a shadow, in the shadow memfd: 0).
    """
    shm_offset: int
    length: int
    fd_offset: int
    shadow: bool = False


def page_floor(value: int) -> int:
    return value - value % PAGE_SIZE


def plan_pieces(moffset: int, foffset: int, length: int, file_size: int) -> tuple[Piece, ...]:
    """The pieces that back ``length`` bytes of the file at ``foffset`` in window offset
    ``moffset`` when the file is ``file_size`` bytes long (see the module docstring).

    Raises WindowError(EINVAL) when the range starts at or past the end of the file: the
    guest only maps below its i_size, so the file shrank on the host behind its back, and
    mapping nothing there would show it zeros.
    """
    if file_size <= foffset:
        raise WindowError(errno.EINVAL, f"file offset 0x{foffset:x} is at or past the end of the "
                                        f"file ({file_size} bytes)")
    whole = min(length, page_floor(file_size - foffset))
    pieces = []
    if whole:
        pieces.append(Piece(moffset, whole, foffset))
    if whole < length and (file_size - foffset) > whole:
        pieces.append(Piece(moffset + whole, PAGE_SIZE, 0, shadow=True))
    return tuple(pieces)


@dataclass(slots=True)
class Mapping:
    """What one range holds: ``length`` bytes of inode ``nodeid`` at ``foffset``."""
    moffset: int
    nodeid: int
    foffset: int
    length: int
    writable: bool
    pieces: tuple[Piece, ...]
    file_size: int = 0                   # at map time; a change means "re-plan the pieces"
    file_mtime_ns: int = 0
    extra: dict = field(default_factory=dict)   # the manager's I/O state (fds, snapshots)

    @property
    def shadowed(self) -> bool:
        return any(p.shadow for p in self.pieces)

    @property
    def short(self) -> bool:
        """The file ends inside the range: its pieces depend on the file size."""
        return sum(p.length for p in self.pieces if not p.shadow) < self.length


class Window:
    """The ranges of a window of ``size`` bytes (a non-zero multiple of 2 MiB)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % RANGE_SIZE:
            raise ValueError(f"DAX window size must be a non-zero multiple of 2 MiB, got {size}")
        self.size = size
        self.nr_ranges = size // RANGE_SIZE
        self._ranges: dict[int, Mapping] = {}           # moffset -> Mapping
        self._by_inode: dict[int, set[int]] = {}        # nodeid -> moffsets

    # -- validation ---------------------------------------------------------------------
    def check_setup(self, moffset: int, foffset: int, length: int, flags: int) -> bool:
        """Validate a SETUPMAPPING; returns whether the mapping is writable."""
        if flags & ~KNOWN_FLAGS:
            raise WindowError(errno.EINVAL, f"unknown SETUPMAPPING flags 0x{flags:x}")
        if not flags & KNOWN_FLAGS:
            raise WindowError(errno.EINVAL, "SETUPMAPPING asks for neither read nor write")
        self._check_range(moffset, length)
        if foffset % RANGE_SIZE:
            raise WindowError(errno.EINVAL, f"file offset 0x{foffset:x} is not 2 MiB aligned")
        if foffset > MAX_FILE_OFFSET - length:
            raise WindowError(errno.EINVAL, f"file offset 0x{foffset:x} + 0x{length:x} overflows")
        return bool(flags & FLAG_WRITE)

    def check_remove(self, moffset: int, length: int) -> Mapping:
        """Validate one REMOVEMAPPING entry: it must name one whole recorded mapping."""
        self._check_range(moffset, length)
        mapping = self._ranges.get(moffset)
        if mapping is None:
            raise WindowError(errno.ENOENT, f"nothing is mapped at window offset 0x{moffset:x}")
        if mapping.length != length:
            raise WindowError(errno.EINVAL, f"REMOVEMAPPING of 0x{length:x} bytes at 0x{moffset:x} "
                                            f"does not match the mapping of 0x{mapping.length:x}")
        return mapping

    def _check_range(self, moffset: int, length: int) -> None:
        if length == 0 or length > RANGE_SIZE or length % PAGE_SIZE:
            raise WindowError(errno.EINVAL, f"length 0x{length:x} is not a page multiple in 4 KiB..2 MiB")
        if moffset % RANGE_SIZE:
            raise WindowError(errno.EINVAL, f"window offset 0x{moffset:x} is not 2 MiB aligned")
        if moffset >= self.size or moffset + length > self.size:
            raise WindowError(errno.EINVAL, f"window offset 0x{moffset:x} + 0x{length:x} is past "
                                            f"the 0x{self.size:x}-byte window")

    # -- records ------------------------------------------------------------------------
    def get(self, moffset: int) -> Mapping | None:
        return self._ranges.get(moffset)

    def record(self, mapping: Mapping) -> None:
        """Record a mapping in a free range (the caller removed the old one first)."""
        self._check_range(mapping.moffset, mapping.length)
        if mapping.moffset in self._ranges:
            raise WindowError(errno.EBUSY, f"range 0x{mapping.moffset:x} is already mapped")
        end = mapping.moffset + mapping.length
        for piece in mapping.pieces:
            if piece.shm_offset < mapping.moffset or piece.shm_offset + piece.length > end \
                    or piece.shm_offset % PAGE_SIZE or piece.length % PAGE_SIZE or not piece.length:
                raise WindowError(errno.EINVAL, f"piece {piece} outside its range")
        self._ranges[mapping.moffset] = mapping
        self._by_inode.setdefault(mapping.nodeid, set()).add(mapping.moffset)

    def drop(self, moffset: int) -> Mapping | None:
        mapping = self._ranges.pop(moffset, None)
        if mapping is not None:
            offsets = self._by_inode.get(mapping.nodeid)
            if offsets is not None:
                offsets.discard(moffset)
                if not offsets:
                    del self._by_inode[mapping.nodeid]
        return mapping

    def of_inode(self, nodeid: int) -> list[Mapping]:
        return [self._ranges[m] for m in sorted(self._by_inode.get(nodeid, ()))]

    def has_inode(self, nodeid: int) -> bool:
        return nodeid in self._by_inode

    def mappings(self) -> list[Mapping]:
        return [self._ranges[m] for m in sorted(self._ranges)]

    def clear(self) -> list[Mapping]:
        dropped = self.mappings()
        self._ranges.clear()
        self._by_inode.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._ranges)

    def check_invariants(self) -> None:
        """Every piece aligned, inside its range and the window; no two pieces overlap;
        the inode index matches.  Used by the tests; cheap enough to call anywhere."""
        spans = []
        for moffset, mapping in self._ranges.items():
            assert moffset == mapping.moffset and moffset % RANGE_SIZE == 0
            assert 0 < mapping.length <= RANGE_SIZE and moffset + mapping.length <= self.size
            for p in mapping.pieces:
                assert p.shm_offset % PAGE_SIZE == 0 and p.length % PAGE_SIZE == 0 and p.length > 0
                assert moffset <= p.shm_offset and p.shm_offset + p.length <= moffset + mapping.length
                spans.append((p.shm_offset, p.shm_offset + p.length))
            assert moffset in self._by_inode.get(mapping.nodeid, ())
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "overlapping pieces"
        assert sum(len(v) for v in self._by_inode.values()) == len(self._ranges)
