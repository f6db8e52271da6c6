"""A pushed config is held to the config file's rules: what a config would refuse, the client refuses."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from configfiles import conf
from tunvpn.client import Client
from tunvpn.config import ConfigError, InterfaceConfig, parse_config, validate_push
from tunvpn.daemon import Options
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.protocol import control
from tunvpn.protocol.device import ControlReceived

SERVER_PUB = derive_public_key(generate_private_key())
CLIENT_KEY = encode_key(generate_private_key())


def push(addresses: tuple[str, ...] = ("203.0.113.100/24",), mtu: int | None = 1420, dns: tuple[str, ...] = (),
         search: tuple[str, ...] = ()) -> control.ConfigPush:
    return control.ConfigPush(0, addresses=[ipaddress.ip_interface(a) for a in addresses],
                              routes=[ipaddress.ip_network("198.51.100.0/24")],
                              dns=[ipaddress.ip_address(d) for d in dns], search=list(search), mtu=mtu, keepalive=25)


def client_config(*interface_lines: str) -> str:
    return conf("[Interface]", f"PrivateKey = {CLIENT_KEY}", *interface_lines,
                "[Peer]", f"PublicKey = {encode_key(SERVER_PUB)}", "Endpoint = 192.0.2.1:51820")


def client_interface(*lines: str) -> InterfaceConfig:
    return parse_config(client_config(*lines), "/etc/tunvpn/office.conf", role="client", resolve=False).interface


MINIMAL_CLIENT = client_interface()  # takes all from the server


def as_client_config(pushed: control.ConfigPush) -> str:
    """The client config that sets what `pushed` carries, line by line."""
    lines = [f"Address = {address}" for address in pushed.addresses]
    lines += [f"MTU = {pushed.mtu}"] if pushed.mtu is not None else []
    lines += [f"DNS = {entry}" for entry in [*pushed.dns, *pushed.search]]
    return client_config(*lines)


GOOD = [
    {},
    {"addresses": ("203.0.113.100/24", "2001:db8:100::2/64"), "mtu": 1280, "dns": ("198.51.100.53", "2001:db8::53"),
     "search": ("office.example", "lab.example.", "_srv.example")},
    {"addresses": (), "mtu": None},
    {"addresses": ("203.0.113.100/24",), "mtu": 576},  # IPv4 only: below 1280 is fine, as in a config
    {"addresses": ("203.0.113.100/32", "fe80::2/64")},
]

BAD = [
    ({"mtu": 68}, "MTU: '68' is not a number in 576-65535"),
    ({"mtu": 575}, "MTU: '575' is not a number in 576-65535"),
    ({"addresses": ("2001:db8:100::2/64",), "mtu": 1279}, "MTU: 1279 is below 1280, the minimum with an IPv6 Address"),
    ({"addresses": ("203.0.113.100/0",)},
     "Address: 203.0.113.100/0: prefix length 0 would put every address on this link; give the tunnel subnet's length"),
    ({"addresses": ("2001:db8:100::2/0",)},
     "Address: 2001:db8:100::2/0: prefix length 0 would put every address on this link; "
     "give the tunnel subnet's length"),
    ({"addresses": ("224.0.0.5/24",)}, "Address: 224.0.0.5 is a multicast address, not one an interface can have"),
    ({"addresses": ("ff02::1/64",)}, "Address: ff02::1 is a multicast address, not one an interface can have"),
    ({"addresses": ("127.0.0.2/8",)}, "Address: 127.0.0.2 is a loopback address, not one an interface can have"),
    ({"addresses": ("0.0.0.0/24",)}, "Address: 0.0.0.0 is the unspecified address, not one an interface can have"),
    ({"dns": ("224.0.0.251",)}, "DNS: 224.0.0.251 cannot be a DNS server"),
    ({"dns": ("::",)}, "DNS: :: cannot be a DNS server"),
    ({"search": ("bücher.example",)}, "DNS: 'bücher.example' is not a DNS search domain"),
    ({"search": ("-office.example",)}, "DNS: '-office.example' is not a DNS search domain"),
    ({"search": ("office.123",)}, "DNS: 'office.123' is not a DNS search domain"),  # a mistyped address
]


@pytest.mark.parametrize("values", GOOD)
def test_a_push_a_config_could_hold_passes(values: dict[str, Any]) -> None:
    assert validate_push(push(**values), MINIMAL_CLIENT) == []


@pytest.mark.parametrize("values, reason", BAD)
def test_a_push_a_config_could_not_hold_is_refused_with_the_reason(values: dict[str, Any], reason: str) -> None:
    assert validate_push(push(**values), MINIMAL_CLIENT) == [reason]


@pytest.mark.parametrize("own_lines, values, reasons", [
    # the pushed MTU with the client's own IPv6 address
    (("Address = 2001:db8:100::9/64",), {"mtu": 1000},
     ["MTU: 1000 is below 1280, the minimum with an IPv6 Address"]),
    # the client's own MTU line with a pushed IPv6 address
    (("MTU = 1000",), {"addresses": ("203.0.113.100/24", "2001:db8:100::2/64"), "mtu": 1420},
     ["MTU: 1000 is below 1280, the minimum with an IPv6 Address"]),
    # the client's own MTU line wins, so a small pushed MTU does not meet the IPv6 address
    (("MTU = 1420",), {"addresses": ("2001:db8:100::2/64",), "mtu": 1000}, []),
    (("MTU = 1000",), {"addresses": ("203.0.113.100/24",), "mtu": 1420}, []),
    # a pushed MTU out of range is refused even where the client's own MTU line would win
    (("MTU = 1420",), {"mtu": 68}, ["MTU: '68' is not a number in 576-65535"]),
])
def test_the_mtu_is_judged_with_the_clients_own_address_and_mtu(own_lines: tuple[str, ...], values: dict[str, Any],
                                                                  reasons: list[str]) -> None:
    """The config the client would end up with is what must pass: its own lines and the push together."""
    assert validate_push(push(**values), client_interface(*own_lines)) == reasons


@pytest.mark.parametrize("values", [*GOOD, *(values for values, _ in BAD)])
def test_the_push_and_the_config_file_agree(values: dict[str, Any]) -> None:
    """One set of rules: a push is refused exactly when the same values in a config file are, for the same key."""
    pushed = push(**values)
    reasons = validate_push(pushed, MINIMAL_CLIENT)
    try:
        parse_config(as_client_config(pushed), "/etc/tunvpn/office.conf", role="client", resolve=False)
    except ConfigError as error:
        assert len(reasons) == 1 and reasons[0].startswith(f"{error.key}: ")
    else:
        assert reasons == []


def test_every_reason_is_given_at_once() -> None:
    """One log line tells the server's admin all there is to fix."""
    pushed = push(("224.0.0.5/24", "2001:db8:100::2/64"), mtu=1000, dns=("::",), search=("bücher.example",))
    assert validate_push(pushed, MINIMAL_CLIENT) == [
        "Address: 224.0.0.5 is a multicast address, not one an interface can have",
        "MTU: 1000 is below 1280, the minimum with an IPv6 Address",
        "DNS: :: cannot be a DNS server",
        "DNS: 'bücher.example' is not a DNS search domain",
    ]


def test_the_client_refuses_a_bad_push_whole_and_keeps_what_it_has(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    client = Client(parse_config(client_config(), "/etc/tunvpn/office.conf", role="client", resolve=False), Options())
    applied: list[control.ConfigPush] = []
    monkeypatch.setattr(client, "_apply_push", applied.append)
    bad = push(("203.0.113.100/24", "2001:db8:100::2/64"), mtu=68, search=("bücher.example",))

    with caplog.at_level(logging.WARNING, logger="tunvpn"):
        client.handle_event(ControlReceived(SERVER_PUB, control.encode(bad)), now=0.0)

    assert applied == []
    assert client.device.peer_stats(SERVER_PUB).dropped["invalid_config_push"] == 1
    assert ("refused the server's config push, keeping the config in use: MTU: '68' is not a number in 576-65535; "
            "DNS: 'bücher.example' is not a DNS search domain") in caplog.text
    good = push(("203.0.113.100/24", "2001:db8:100::2/64"))
    client.handle_event(ControlReceived(SERVER_PUB, control.encode(good)), now=1.0)
    assert applied == [good]
