"""The Forwarding stage: who the client is (X-Forwarded-For walked right to left, believed only
from trusted proxies) and the forwarding headers the upstream gets (DESIGN §5.2)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from garrison.netaddr import CACHE_MAX
from garrison.pipeline.exchange import Exchange
from garrison.pipeline.forwarding import Forwarding

TRUSTED = ["10.0.0.0/8", "192.168.1.1", "fd00::/8"]


def exchange(peer: str, *xff: bytes, host: bytes | None = b"app.example") -> Exchange:
    headers = [(b"x-forwarded-for", v) for v in xff]
    if host is not None:
        headers.append((b"host", host))
    ex = Exchange("GET", b"/", "1.1", headers, peer)
    ex.host = host.decode() if host else ""
    return ex


def walk(peer: str, *xff: bytes, trusted: list[str] = TRUSTED) -> tuple[str, bytes]:
    return Forwarding(trusted).client_ip(peer, list(xff))


# -- whose X-Forwarded-For is believed ------------------------------------------------------------


def test_without_trusted_proxies_xff_is_ignored() -> None:
    assert walk("203.0.113.9", b"1.2.3.4", trusted=[]) == ("203.0.113.9", b"203.0.113.9")


def test_xff_from_an_untrusted_peer_is_ignored_and_not_passed_on() -> None:
    client, chain = walk("203.0.113.9", b"1.2.3.4, 10.0.0.1")
    assert client == "203.0.113.9"
    assert chain == b"203.0.113.9"


def test_trusted_peer_without_xff_is_the_client() -> None:
    assert walk("10.1.2.3") == ("10.1.2.3", b"10.1.2.3")


def test_one_hop_behind_a_trusted_proxy() -> None:
    client, chain = walk("10.0.0.5", b"198.51.100.7")
    assert client == "198.51.100.7"
    assert chain == b"198.51.100.7, 10.0.0.5"


def test_walk_stops_at_the_first_untrusted_hop_from_the_right() -> None:
    # The client can write anything left of its own address: 6.6.6.6 is its lie.
    client, chain = walk("10.0.0.5", b"6.6.6.6, 198.51.100.7, 10.0.0.2, 192.168.1.1")
    assert client == "198.51.100.7"
    assert chain == b"6.6.6.6, 198.51.100.7, 10.0.0.2, 192.168.1.1, 10.0.0.5"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert walk("10.0.0.5", b"10.9.9.9, 10.0.0.2")[0] == "10.9.9.9"


def test_several_xff_headers_are_one_list_in_order() -> None:
    client, chain = walk("10.0.0.5", b"6.6.6.6", b"198.51.100.7, 10.0.0.2")
    assert client == "198.51.100.7"
    assert chain == b"6.6.6.6, 198.51.100.7, 10.0.0.2, 10.0.0.5"


def test_empty_entries_are_skipped() -> None:
    client, chain = walk("10.0.0.5", b" , 198.51.100.7 ,, ")
    assert client == "198.51.100.7"
    assert chain == b"198.51.100.7, 10.0.0.5"


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        (b"garbage", "10.0.0.5"),  # nothing usable: the trusted peer itself
        (b"198.51.100.7, not-an-ip", "10.0.0.5"),
        (b"198.51.100.7, not-an-ip, 10.0.0.2", "10.0.0.2"),  # the last trusted hop
        (b"198.51.100.7:4711", "10.0.0.5"),  # ports are not addresses
        (b"[2001:db8::1]", "10.0.0.5"),
        (b"unknown", "10.0.0.5"),
    ],
)
def test_a_non_ip_hop_is_never_the_client(xff: bytes, client: str) -> None:
    assert walk("10.0.0.5", xff)[0] == client


def test_ipv6_and_ipv4_mapped_addresses() -> None:
    assert walk("fd00::1", b"2001:db8::7")[0] == "2001:db8::7"
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they match IPv4 networks.
    assert walk("::ffff:10.0.0.5", b"198.51.100.7")[0] == "198.51.100.7"
    assert walk("::ffff:203.0.113.9", b"198.51.100.7")[0] == "::ffff:203.0.113.9"
    assert walk("10.0.0.5", b"::ffff:10.0.0.9, 198.51.100.7")[0] == "198.51.100.7"


def test_is_trusted_networks_and_single_addresses() -> None:
    fwd = Forwarding(TRUSTED)
    assert fwd.is_trusted("10.255.255.255")
    assert fwd.is_trusted("192.168.1.1")
    assert not fwd.is_trusted("192.168.1.2")
    assert fwd.is_trusted("fd12::1")
    assert not fwd.is_trusted("fe80::1")
    assert not fwd.is_trusted("")
    assert not fwd.is_trusted("not an ip")


def test_is_trusted_cache_stays_correct_when_it_is_cleared() -> None:
    fwd = Forwarding(["10.0.0.0/8"])
    for i in range(5000):
        ip = f"10.{i // 256 % 256}.{i % 256}.1" if i % 2 else f"11.0.{i // 256 % 256}.{i % 256}"
        assert fwd.is_trusted(ip) == (i % 2 == 1)
    assert len(fwd.trusted._cache) <= CACHE_MAX


# -- properties -----------------------------------------------------------------------------------

_ip = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.sampled_from(["10.0.0.1", "10.2.3.4", "192.168.1.1", "fd00::5"]),
)
_hop = st.one_of(_ip, st.sampled_from(["", "junk", "1.2.3.4:80", "unknown"]))


@given(peer=_ip, hops=st.lists(_hop, max_size=6))
def test_the_client_is_the_peer_or_the_first_untrusted_valid_hop(
    peer: str, hops: list[str]
) -> None:
    fwd = Forwarding(TRUSTED)
    client, chain = fwd.client_ip(peer, [", ".join(hops).encode()] if hops else [])
    ipaddress.ip_address(client)  # always an address
    if not fwd.is_trusted(peer):
        assert (client, chain) == (peer, peer.encode())
        return
    # Reference walk, written out plainly.
    expected = peer
    for hop in reversed([h for h in hops if h.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        expected = hop
        if not fwd.is_trusted(hop):
            break
    assert client == expected
    assert chain.endswith(peer.encode())


# -- the stage ------------------------------------------------------------------------------------


def test_stage_sets_the_forwarding_headers() -> None:
    ex = exchange("10.0.0.5", b"198.51.100.7")
    assert Forwarding(TRUSTED)(ex) is None
    assert ex.client_ip == "198.51.100.7"
    assert ex.upstream_headers == [
        (b"x-forwarded-for", b"198.51.100.7, 10.0.0.5"),
        (b"x-real-ip", b"198.51.100.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"app.example"),
    ]


def test_stage_without_trust_ignores_client_headers() -> None:
    ex = exchange("203.0.113.9", b"1.2.3.4", host=None)
    Forwarding([])(ex)
    assert ex.client_ip == "203.0.113.9"
    assert dict(ex.upstream_headers) == {
        b"x-forwarded-for": b"203.0.113.9",
        b"x-real-ip": b"203.0.113.9",
        b"x-forwarded-proto": b"https",
    }


def test_stage_plain_http_proto() -> None:
    ex = exchange("203.0.113.9")
    ex.tls = False
    Forwarding([])(ex)
    assert (b"x-forwarded-proto", b"http") in ex.upstream_headers
