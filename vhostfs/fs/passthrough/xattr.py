"""Extended attributes: the ``--xattrmap`` rule language (virtiofsd syntax) and the
host calls.

Host calls go through the inode's magic link ``/proc/self/fd/N`` (N its O_PATH fd),
following it: the link names the inode itself, whatever its type, so a symlink's own
xattrs are reached (like ``l*xattr``) and a FIFO or device is never opened.

xattrmap (virtiofsd's doc/xattr-mapping.md): rules ``<sep>type<sep>scope<sep>key<sep>
prepend<sep>``; ``type`` prefix|ok|bad|unsupported, ``scope`` client|server|all; or one
final ``<sep>map<sep>key<sep>prepend<sep>``.  The first matching rule applies; a name no
rule matches is refused (client side, EPERM) or hidden (server side).
"""
from __future__ import annotations

import dataclasses
import errno
import os

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_TYPES = ("prefix", "ok", "bad", "unsupported")
_SCOPES = ("client", "server", "all")


class XattrMapError(ValueError):
    """A malformed --xattrmap string (the message names the rule)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    type: str
    client: bool
    server: bool
    key: bytes
    prepend: bytes


def parse_xattrmap(text: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    rest = text
    seen_map = False
    while rest.strip():
        rest = rest.lstrip()
        sep, rest = rest[0], rest[1:]
        fields = []
        for _ in range(4):
            part, found, rest = rest.partition(sep)
            if not found:
                raise XattrMapError(f"xattrmap: rule {len(rules) + 1} is not closed by {sep!r}")
            fields.append(part)
            if fields[0] == "map" and len(fields) == 3:
                break
        if seen_map:
            raise XattrMapError("xattrmap: a 'map' rule must be the last rule")
        if fields[0] == "map":
            seen_map = True
            rules.extend(_expand_map(fields[1].encode(), fields[2].encode()))
            continue
        typ, scope, key, prepend = fields
        if typ not in _TYPES:
            raise XattrMapError(f"xattrmap: unknown rule type {typ!r}")
        if scope not in _SCOPES:
            raise XattrMapError(f"xattrmap: unknown scope {scope!r}")
        rules.append(Rule(typ, scope in ("client", "all"), scope in ("server", "all"),
                          key.encode(), prepend.encode()))
    if not rules:
        raise XattrMapError("xattrmap: no rules")
    return tuple(rules)


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    """virtiofsd's expansion of ``:map:key:prepend:``."""
    out = [Rule("prefix", True, True, key, prepend)]
    if not key:
        out.append(Rule("bad", True, True, b"", b""))
    else:
        out += [Rule("bad", False, True, b"", key),      # hide unprefixed host names
                Rule("bad", True, False, prepend, b""),  # no direct use of the prefix
                Rule("ok", True, True, b"", b"")]
    return out


class XattrMap:
    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules

    @classmethod
    def parse(cls, text: str) -> "XattrMap":
        return cls(parse_xattrmap(text))

    def to_host(self, name: bytes) -> bytes:
        """A guest name -> the host name; EPERM (bad) / EOPNOTSUPP (unsupported)."""
        for r in self.rules:
            if r.client and name.startswith(r.key):
                if r.type == "ok":
                    return name
                if r.type == "prefix":
                    return r.prepend + name
                if r.type == "unsupported":
                    raise OSError(errno.EOPNOTSUPP, "xattr name unsupported by the map")
                raise OSError(errno.EPERM, "xattr name refused by the map")
        raise OSError(errno.EPERM, "no xattrmap rule matches")

    def to_guest(self, name: bytes) -> bytes | None:
        """A host name (listxattr) -> the guest name, or None when hidden."""
        for r in self.rules:
            if r.server and name.startswith(r.prepend):
                if r.type == "ok":
                    return name
                if r.type == "prefix":
                    return name[len(r.prepend):]
                return None
        return None


def check_name(name: bytes) -> None:
    if not name or len(name) > XATTR_NAME_MAX:
        raise OSError(errno.ERANGE if name else errno.EINVAL, "bad xattr name length")


def join_names(names: list[bytes]) -> bytes:
    return b"".join(n + b"\0" for n in names)
