"""Capture backends (see :mod:`.base` for the seam); :func:`make_capture` picks one."""

from stead.replication.capture.factory import Backend, make_capture

__all__ = ["Backend", "make_capture"]
