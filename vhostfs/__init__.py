"""vhostfs: a virtio-fs device backend (vhost-user-fs) for QEMU."""

__version__ = "0.1.0"
