"""TCP port forwarding: ``-L tcp://:8080/host:port[,host2:port2]``.

Every accepted connection is relayed to the next target in turn (round robin), dialed
through the chain like any other tunnel.
"""

from __future__ import annotations

from pyegress.endpoint import Endpoint
from pyegress.engine import Service


async def serve(client: Endpoint, service: Service) -> None:
    host, port = service.next_forward_target()
    with service.tunnel(client, "tcp") as t:
        upstream = await service.dial(t, host, port)
        await service.relay(t, client, upstream)
