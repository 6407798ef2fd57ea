"""``stead lab``: several Stead hosts on one machine, as Linux namespaces."""

from stead.lab.netns import BRIDGE, BRIDGE_ADDRESS
from stead.lab.nodes import DEFAULT_LAB_DIR, PROTECT, Lab, find_lab, node_names

__all__ = [
    "BRIDGE",
    "BRIDGE_ADDRESS",
    "DEFAULT_LAB_DIR",
    "PROTECT",
    "Lab",
    "find_lab",
    "node_names",
]
