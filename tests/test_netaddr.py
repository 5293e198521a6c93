"""One address rule for trusted proxies, metrics and admin: mapped IPv6 is IPv4, junk matches
nothing, and a bad network in the config says which one."""

from __future__ import annotations

import re

import pytest

from garrison.netaddr import NetworkList, address, check_networks


def test_mapped_ipv6_is_its_ipv4_address() -> None:
    assert str(address("::ffff:127.0.0.1")) == "127.0.0.1"
    assert address("not an ip") is None and address("") is None
    allowed = NetworkList(["127.0.0.0/8", "::1/128"])
    assert "::ffff:127.0.0.9" in allowed and "::1" in allowed and "127.1.2.3" in allowed
    assert "10.0.0.1" not in allowed and "::2" not in allowed and "junk" not in allowed
    assert None not in allowed  # not a string: never allowed
    assert not NetworkList([]) and allowed


def test_check_networks_names_the_bad_item() -> None:
    assert check_networks(["10.0.0.0/8", "fd00::1"]) == ["10.0.0.0/8", "fd00::1"]
    message = "'10.0.0.0/33' is not an IP address or CIDR network"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_networks(["10.0.0.0/8", "10.0.0.0/33"])
