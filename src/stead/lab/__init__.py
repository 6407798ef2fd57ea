"""``stead lab``: several Stead hosts on one machine, as Linux namespaces."""

from stead.lab.config import DEMO_PORT, PUBLIC_HOSTNAME
from stead.lab.netns import (
    BRIDGE,
    BRIDGE_ADDRESS,
    CLIENT,
    CLIENT_ADDRESS,
    PUB_BRIDGE,
    PUB_GATEWAY,
    PUB_IFNAME,
    SERVICE_ADDRESS,
)
from stead.lab.nodes import DEFAULT_LAB_DIR, PROTECT, Lab, find_lab, node_names

__all__ = [
    "BRIDGE",
    "BRIDGE_ADDRESS",
    "CLIENT",
    "CLIENT_ADDRESS",
    "DEFAULT_LAB_DIR",
    "DEMO_PORT",
    "PROTECT",
    "PUBLIC_HOSTNAME",
    "PUB_BRIDGE",
    "PUB_GATEWAY",
    "PUB_IFNAME",
    "SERVICE_ADDRESS",
    "Lab",
    "find_lab",
    "node_names",
]
