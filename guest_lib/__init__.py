"""guest_lib: what runs inside a guest (or in a host process, with the same API).

`guest_lib.host_client.attach(socket_path)` joins a broker-served region from a host process.
"""
