"""The protocol-side exception tree.

Filesystem errors are plain ``OSError`` and become ``-errno`` in exactly one place
(``vhostfs.fuse.server``).  Everything here is about the transport: a malformed
vhost-user message, guest memory that does not translate, a descriptor chain that
breaks the virtio rules.  These mark a request, a queue or the device broken with one
clear log line; they are never answered as filesystem errors.
"""


class VhostfsError(Exception):
    """Base of every protocol-side error."""


class ConfigError(VhostfsError):
    """A command-line option or configuration value is invalid (names the option)."""


class ProtocolError(VhostfsError):
    """A vhost-user message broke the protocol (names the request)."""


class GuestMemoryError(VhostfsError):
    """A guest address or length does not lie inside the guest's memory regions."""


class VirtqueueError(VhostfsError):
    """A ring or descriptor chain violates the virtio split-queue rules."""


class ChainError(VirtqueueError):
    """One descriptor chain is malformed; the chain is dropped, the queue may go on."""


class QueueBroken(VirtqueueError):
    """The ring itself is unusable (e.g. avail idx jumped by more than the queue size)."""


class FuseProtocolError(VhostfsError):
    """A FUSE request is malformed beyond what an errno reply can express."""
