"""FUSE session layer: wire ABI (abi), reply packing (replies), dispatch (server)."""
