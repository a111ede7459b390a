"""Filesystems served over FUSE: the contract (api) and implementations (passthrough)."""
