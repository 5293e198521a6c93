"""Client addresses against configured networks: `trusted_proxies`, `[metrics] allow`,
`[admin] allow`. One rule everywhere: an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, what
a dual-stack socket reports for an IPv4 client) is its IPv4 address, and a string that is not
an address matches nothing."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CACHE_MAX = 4096  # distinct client addresses remembered per list; then it starts over


def address(ip: str) -> Address | None:
    """The address, IPv4-mapped IPv6 unmapped; None when `ip` is not an address."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def check_networks(items: list[str]) -> list[str]:
    """A config validator: every item is an IP address or a CIDR network."""
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from exc
    return items


class NetworkList:
    """`ip in networks`: whether an address is in any of the networks, cached per address
    (the forwarding stage asks on every request)."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in cidrs
        )
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        known = self._cache.get(ip)
        if known is None:
            parsed = address(ip)
            known = parsed is not None and any(parsed in net for net in self.networks)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[ip] = known
        return known
