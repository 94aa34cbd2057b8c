"""DHCP for VMs and for nodes being birthed: codec (packet), decisions (responder), leases,
and the asyncio transport bound to one interface (server)."""
