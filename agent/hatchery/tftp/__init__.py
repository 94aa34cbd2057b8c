"""Read-only TFTP server (RFC 1350, 2347, 2348, 2349, 7440) for PXE boot loaders.

``TftpServer(root, host, port, limits)`` is what the agent runs; ``hatchery-agent serve tftp``
runs it alone (``hatchery.tftp.cli``).
"""

from hatchery.tftp.server import TftpLimits, TftpServer

__all__ = ["TftpLimits", "TftpServer"]
