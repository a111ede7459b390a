"""Shared test helpers (fake guest memory, virtqueue driver)."""
