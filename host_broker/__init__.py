"""Host broker: regions for jobs, QEMU's ivshmem-server protocol, peer lifecycle, CLI.

`ivshmem-broker serve` (or `python -m host_broker serve`) runs the daemon; see broker.py for
the lifecycle and restart design, protocol.py for the wire protocol, config.py for settings.
"""
