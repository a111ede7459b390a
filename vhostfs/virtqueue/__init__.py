"""Split virtqueues (virtio 1.2 §2.7): ring access, chain walk, guest buffer I/O.

``layout`` declares the wire format, ``chain`` walks and validates descriptor chains,
``split`` is the device side of a queue, ``iov`` reads and writes the chain's buffers.
"""
from vhostfs.virtqueue.chain import BadChain, DescriptorChain
from vhostfs.virtqueue.iov import GuestBufferTooSmall, Reader, Writer
from vhostfs.virtqueue.split import SplitQueue

__all__ = ["BadChain", "DescriptorChain", "GuestBufferTooSmall", "Reader", "SplitQueue", "Writer"]
