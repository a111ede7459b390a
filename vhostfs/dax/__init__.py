"""DAX cache window: ``window`` (pure bookkeeping of 2 MiB ranges) and ``manager``
(validate -> map through the front end -> record).  See docs/dax.md."""
from vhostfs.dax.manager import DaxManager, FrontendRefused, MapChannel
from vhostfs.dax.window import RANGE_SIZE, Window, WindowError

__all__ = ["DaxManager", "FrontendRefused", "MapChannel", "RANGE_SIZE", "Window", "WindowError"]
