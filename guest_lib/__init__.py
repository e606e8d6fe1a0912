"""guest_lib: what runs inside a guest (or in a host process, with the same API).

`guest_lib.attach()` finds this process's region (an ivshmem PCI device in a guest, a broker
socket or a region name on a host) and returns its Endpoint; see guest_lib.attach.
`guest_lib.host_client.attach(socket_path)` joins a broker-served region from a host process.
"""

from guest_lib.attach import AttachError, Attachment, attach

__all__ = ["AttachError", "Attachment", "attach"]
