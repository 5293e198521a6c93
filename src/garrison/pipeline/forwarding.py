"""Stage: who the client is, and the forwarding headers the upstream gets (DESIGN §5.2).

Incoming X-Forwarded-*, X-Real-IP, Forwarded, X-SSL-Client-* and X-Garrison-* are dropped by the
data plane whatever this stage does; here we set our own. X-Forwarded-For is believed only when
the connecting peer is a configured trusted proxy, walking the chain right to left.
"""

from __future__ import annotations

from collections.abc import Sequence

from garrison.netaddr import NetworkList, address
from garrison.pipeline.exchange import Exchange
from garrison.pipeline.pipeline import Stage


class Forwarding(Stage):
    name = "forwarding"

    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self.trusted = NetworkList(trusted_proxies)

    def is_trusted(self, ip: str) -> bool:
        return ip in self.trusted

    def client_ip(self, peer: str, xff: list[bytes]) -> tuple[str, bytes]:
        """The client's IP and the X-Forwarded-For chain to send on."""
        if not self.trusted or not xff or not self.is_trusted(peer):
            return peer, peer.encode()
        hops = [h.strip().decode("latin-1") for v in xff for h in v.split(b",") if h.strip()]
        client = peer
        for hop in reversed(hops):
            if address(hop) is None:
                break  # garbage in the chain: the last trusted hop is the best we know
            client = hop
            if not self.is_trusted(hop):
                break
        chain = ", ".join([*hops, peer]).encode("latin-1")
        return client, chain

    def __call__(self, ex: Exchange) -> None:
        xff = [v for n, v in ex.headers if n == b"x-forwarded-for"] if self.trusted else []
        ex.client_ip, chain = self.client_ip(ex.peer_ip, xff)
        extra = ex.upstream_headers
        extra.append((b"x-forwarded-for", chain))
        extra.append((b"x-real-ip", ex.client_ip.encode()))
        extra.append((b"x-forwarded-proto", b"https" if ex.tls else b"http"))
        if ex.host:
            extra.append((b"x-forwarded-host", ex.host.encode("latin-1")))
        return None
