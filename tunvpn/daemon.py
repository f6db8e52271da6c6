"""What the server and client daemons share: bring-up, the loop, status, reload, shutdown.

A daemon only wires parts together: config -> protocol core -> tun, netlink,
UDP, control socket, systemd.  Everything it configures on the system it
records (LinkSetup's undo stack) and removes exactly that on exit.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import signal
import time
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, PeerConfig, load_config
from .io.controlsocket import DEFAULT_RUN_DIR, ControlServer
from .io.loop import EventLoop, Faults
from .io.metrics import MetricsServer, write_metrics_file
from .io.worker import InlineWorker, Worker
from .io.netlink import LinkSetup, NetlinkError
from .io.systemd import Notifier
from .io.tun import TunDevice
from .io.udp import UdpTransport
from .keys import encode_key
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, render as render_metrics
from .protocol.device import (
    DEFAULT_LOAD_THRESHOLD,
    ControlReceived,
    CookieReceived,
    Device,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeysExpired,
)
from .protocol.timers import REKEY_ATTEMPT_TIME

log = logging.getLogger("tunvpn")

STATUS_INTERVAL = 1.0  # seconds between two STATUS= updates at most
METRICS_FILE_INTERVAL = 15.0  # a textfile collector is read at each scrape; 15 s is Prometheus's default interval

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# The data path's offloads (docs/architecture.md): TCP bursts merged into one tun write, UDP
# segmentation on send, UDP receive offload.
OFFLOADS = frozenset({"coalesce", "gso", "gro"})


@dataclass(frozen=True)
class Options:
    """Command-line settings that are not in the config file."""

    control_socket: Path | None = None
    state_dir: Path | None = None
    load_threshold: int = DEFAULT_LOAD_THRESHOLD
    offloads: frozenset[str] = OFFLOADS


def short_key(key: bytes) -> str:
    return encode_key(key)[:10] + "…"


def format_endpoint(endpoint: tuple | None) -> str | None:
    if endpoint is None:
        return None
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _counts(counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "none"


class PeerLogLimit:
    """Per peer and kind of line, at most `burst` log lines per `window` seconds.

    A peer controls how often some lines appear (a goodbye per packet, a handshake per second):
    without a limit one client could fill the journal.  Lines held back are counted and said
    when that peer's next line of the kind comes after the window.
    """

    MAX_TRACKED = 4096  # (peer, kind) pairs before expired windows are dropped

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        self.burst = burst
        self.window = window
        # -> [window start, lines in it], oldest window first
        self._windows: OrderedDict[tuple[bytes, str], list[float]] = OrderedDict()

    def allow(self, public_key: bytes, kind: str, now: float) -> bool:
        key = (public_key, kind)
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window:
            if window is not None and window[1] > self.burst:
                log.info("peer %s: %d more %s line(s) held back in %.0f s", short_key(public_key),
                         window[1] - self.burst, kind, now - window[0])
            if window is None and len(self._windows) >= self.MAX_TRACKED:
                self._drop_expired(now)
            window = self._windows[key] = [now, 0]
            self._windows.move_to_end(key)
        window[1] += 1
        return window[1] <= self.burst

    def _drop_expired(self, now: float) -> None:
        """Expired windows are the oldest, at the front: dropping them costs what is dropped, so
        thousands of peers connecting within one window no longer walk the whole table each."""
        windows = self._windows
        while windows and now - next(iter(windows.values()))[0] >= self.window:
            windows.popitem(last=False)


class Daemon:
    """The shared life cycle; `Server` and `Client` fill in the role-specific hooks."""

    role = "daemon"

    def __init__(self, config: Config, options: Options) -> None:
        self.config = config
        self.options = options
        self.notifier = Notifier.from_environment()
        self.device = self.build_device()
        self.device.set_control_messages(True)  # both roles speak tunvpn's control extension
        self._watchdog_interval = self.notifier.watchdog_interval()
        self._next_watchdog = 0.0
        self._routes: list[IPNetwork] = []  # the routes into the tun the config asks for
        self.refused: dict[str, str] = {}  # system changes the kernel refused: what -> why and what to do
        self._status_due: float | None = None  # when STATUS= is next sent (None: nothing new to say)
        self._metrics_file_at = 0.0
        self._metrics_file_error: str | None = None
        self._status_sent = float("-inf")
        self.faults = Faults()
        self.peer_log = PeerLogLimit()
        # Blocking work: name resolution (slow resolvers) on one thread, disk and helper
        # programs on another.  Inline until the loop runs.
        self.resolver: Worker | InlineWorker = InlineWorker()
        self.system: Worker | InlineWorker = InlineWorker()
        self.udp: UdpTransport
        self.tun: TunDevice
        self.link: LinkSetup
        self.loop: EventLoop

    # --- hooks for the roles ---------------------------------------------------------

    def build_device(self) -> Device:
        raise NotImplementedError

    def configure_link(self) -> None:
        """Addresses, MTU, routes on the fresh tun."""
        raise NotImplementedError

    def started(self, now: float) -> None:
        """The device is up: initiate what should be initiated."""

    def handle_event(self, event: Event, now: float) -> None:
        """Role-specific reaction to a core event (after it was logged)."""

    def tick(self, now: float) -> float | None:
        """Role timers; returns the next deadline."""
        return None

    def apply_reload(self, new: Config, now: float) -> None:
        raise NotImplementedError

    def say_goodbye(self, now: float) -> None:
        """Shutdown: tell tunvpn peers we are going."""

    def status_extra(self) -> dict:
        return {}

    def peer_status_extra(self, public_key: bytes) -> dict:
        return {}

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        keys = self.device.peer_keys()
        established = sum(1 for key in keys if self.device.has_session(key))
        line = f"{established} of {len(keys)} peers connected"
        if self.refused:
            line += f"; {len(self.refused)} setting(s) refused by the kernel, see tunvpn show"
        return line

    # --- shared helpers ----------------------------------------------------------------

    @property
    def control_socket_path(self) -> Path:
        return self.options.control_socket or Path(DEFAULT_RUN_DIR) / f"{self.config.name}.sock"

    def peer_device_settings(self, peer: PeerConfig, extra_allowed: list[IPNetwork] = ()) -> dict:
        return dict(
            preshared_key=peer.preshared_key,
            allowed_ips=[*peer.allowed_ips, *extra_allowed],
            persistent_keepalive=peer.persistent_keepalive,
        )

    def apply_or_report(self, what: str, change: Callable[[], object]) -> bool:
        """Make one change to the system; a refusal is logged with what the admin can do,
        shown by `tunvpn show` and STATUS=, and everything else carries on."""
        try:
            change()
        except NetlinkError as exc:
            reason = f"{exc}{_advice(what, exc.code)}"
            if self.refused.get(what) != reason:
                log.error("%s refused; carrying on without it: %s", what, reason)
                self.refused[what] = reason
                self.status_changed()
            return False
        self.forget_refusal(what, applied=True)
        return True

    def forget_refusal(self, what: str, applied: bool = False) -> None:
        if self.refused.pop(what, None) is not None:
            log.info("%s %s", what, "applied now" if applied else "no longer wanted")
            self.status_changed()

    def set_routes(self, wanted: list[IPNetwork]) -> None:
        """Route exactly `wanted` into the tun: both roles diff old against new here, once.

        A route the kernel refused stays wanted and is tried again on the next change or reload
        (the admin may have removed the conflicting route meanwhile).  /0 is left to the
        client's full-tunnel policy routing.
        """
        wanted = list(dict.fromkeys(net for net in wanted if net.prefixlen != 0))
        keep = set(wanted)
        for network in self._routes:
            if network in keep:
                continue
            what = f"route {network}"
            if what in self.refused:
                self.forget_refusal(what)
            else:
                self.apply_or_report(f"removing {what}", lambda: self.link.remove_route(network))
        before = set(self._routes)
        for network in wanted:
            what = f"route {network}"
            if network not in before or what in self.refused:
                self.apply_or_report(what, lambda: self.link.add_route(network))
        self._routes = wanted

    # --- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Bring the daemon up, run until SIGTERM/SIGINT, take down what we set up."""
        interface = self.config.interface
        with ExitStack() as cleanup:
            self.cleanup = cleanup  # roles register their own undo steps (e.g. DNS) here
            offloads = self.options.offloads
            self.udp = UdpTransport(interface.listen_port, gso="gso" in offloads, gro="gro" in offloads)
            cleanup.callback(self.udp.close)
            self.tun = TunDevice(interface.device, vnet_header="coalesce" in offloads)
            cleanup.callback(self.tun.close)
            self.link = LinkSetup(self.tun.name)
            cleanup.callback(self.link.close)
            cleanup.callback(self.link.undo)
            control = ControlServer(str(self.control_socket_path), self.handle_request)
            cleanup.callback(control.close)
            self.resolver, self.system = Worker("resolver"), Worker("system")
            cleanup.callback(self._stop_workers)
            services = [control, self.resolver, self.system, *self._metrics_endpoint(cleanup)]
            self.loop = EventLoop(self.device, self.tun, self.udp, on_event=self._on_event, on_tick=self._on_tick,
                                  services=tuple(services), faults=self.faults)
            self.loop.signal_handlers[signal.SIGHUP] = self.reload
            self.loop.signal_handlers[signal.SIGUSR2] = self.log_statistics
            cleanup.callback(self.loop.close)
            # Catch signals before changing the system: one arriving from here on is handled by
            # the loop (after start-up), never fatal halfway through the set-up.
            self.loop.install_signals()
            self.link.set_up()  # routes need the link up
            self.configure_link()
            log.info("%s %s up: device %s, UDP port %d (%d receive queue(s)), public key %s, %d peer(s), offloads: %s",
                     self.role, self.config.name, self.tun.name, self.udp.port, self.udp.receive_queues,
                     encode_key(self.device.public_key), len(self.device.peer_keys()),
                     ", ".join(self.offloads_in_use()) or "none")
            self.started(time.monotonic())
            self.notifier.ready()
            self.notifier.status(self.summary())
            self.loop.run()
            log.info("stopping on signal %d", self.loop.stop_signal)
            self.notifier.stopping()
            self._stop_workers()  # queued saves and DNS changes finish; what follows runs inline
            self.say_goodbye(time.monotonic())
            self.loop.flush()
        return 0

    def _metrics_endpoint(self, cleanup: ExitStack) -> list[MetricsServer]:
        listen = self.config.interface.metrics_listen
        if listen is None:
            return []
        server = MetricsServer(listen, lambda: render_metrics(self.status()), METRICS_CONTENT_TYPE)
        cleanup.callback(server.close)
        log.info("metrics at http://%s/metrics", format_endpoint((listen[0], server.port)))
        return [server]

    def _write_metrics_file(self, now: float) -> float | None:
        """Every METRICS_FILE_INTERVAL: render on the loop, write beside it (a failure is logged)."""
        path = self.config.interface.metrics_file
        if path is None:
            return None
        if now >= self._metrics_file_at:
            self._metrics_file_at = now + METRICS_FILE_INTERVAL
            text = render_metrics(self.status())
            self.system.submit(f"writing {path}", lambda: write_metrics_file(path, text),
                               lambda _, error: self._metrics_written(path, error), key="metrics")
        return self._metrics_file_at

    def _metrics_written(self, path: str, error: BaseException | None) -> None:
        if isinstance(error, OSError):
            if self._metrics_file_error != str(error):  # once per kind of failure, not every 15 s
                log.warning("cannot write metrics to %s: %s", path, error.strerror or error)
            self._metrics_file_error = str(error)
        elif error is not None:
            raise error
        else:
            self._metrics_file_error = None

    def _stop_workers(self) -> None:
        for worker in (self.resolver, self.system):
            if isinstance(worker, Worker):
                worker.close()
        self.resolver, self.system = InlineWorker(), InlineWorker()

    def _on_event(self, event: Event) -> None:
        now = time.monotonic()
        self.log_event(event, now)
        self.handle_event(event, now)
        if isinstance(event, (HandshakeCompleted, KeysExpired, HandshakeGaveUp)):
            self.status_changed()

    def status_changed(self) -> None:
        """STATUS= is due again: sent from the next tick, at most once per STATUS_INTERVAL, since
        the summary walks every peer and thousands of peers rekey every two minutes."""
        if self._status_due is None:
            self._status_due = max(time.monotonic(), self._status_sent + STATUS_INTERVAL)

    def _on_tick(self, now: float) -> float | None:
        deadline = _earliest(self.tick(now), self._write_metrics_file(now))
        if self._status_due is not None:
            if now >= self._status_due:
                self._status_due, self._status_sent = None, now
                self.notifier.status(self.summary())
            else:
                deadline = self._status_due if deadline is None else min(deadline, self._status_due)
        if self._watchdog_interval:
            if now >= self._next_watchdog:
                self.notifier.watchdog()
                self._next_watchdog = now + self._watchdog_interval / 2
            deadline = self._next_watchdog if deadline is None else min(deadline, self._next_watchdog)
        return deadline

    def reload(self) -> None:
        """SIGHUP: read and resolve the config file beside the loop, then apply it on the loop."""
        self.resolver.submit(f"reloading {self.config.path}", self.load_config_file, self._apply_loaded_config,
                             key="reload")

    def load_config_file(self) -> Config:
        """Read the config again (beside the loop: it resolves names and reads key files)."""
        return load_config(self.config.path, role=self.role)

    def _apply_loaded_config(self, new: Config | None, error: BaseException | None) -> None:
        """A broken file is logged and the running config stays."""
        if isinstance(error, ConfigError):
            log.error("reload refused, keeping the running config: %s", error)
            return
        if error is not None:
            raise error
        assert new is not None
        changed = {name: key for name, key in RESTART_SETTINGS.items()
                   if getattr(new.interface, name) != getattr(self.config.interface, name)}
        if "addresses" in changed:
            # The file was checked against its own Address (pool, fixed addresses): applying it
            # with the running one could contradict those checks, so none of it is applied.
            log.error("reload refused: Address changed, which needs a restart; keeping the running config")
            return
        if changed:
            log.warning("reload: %s changed; that needs a restart, the running values stay",
                        ", ".join(sorted(set(changed.values()))))
            kept = {name: getattr(self.config.interface, name) for name in changed}
            new = dataclasses.replace(new, interface=dataclasses.replace(new.interface, **kept))
        self.apply_reload(new, time.monotonic())
        self.loop.flush()
        self.status_changed()

    def diff_peers(self, new: Config) -> tuple[list[PeerConfig], list[bytes], list[PeerConfig]]:
        """(added, removed keys, changed) between the running config and `new`."""
        old = {peer.public_key: peer for peer in self.config.peers}
        fresh = {peer.public_key: peer for peer in new.peers}
        added = [peer for key, peer in fresh.items() if key not in old]
        removed = [key for key in old if key not in fresh]
        changed = [peer for key, peer in fresh.items() if key in old and _peer_settings(old[key]) != _peer_settings(peer)]
        return added, removed, changed

    # --- observability ----------------------------------------------------------------------

    def handle_request(self, request: dict) -> dict:
        command = request.get("command")
        if command == "show":
            return self.status()
        return {"error": f"unknown command {command!r}"}

    def status(self) -> dict:
        peers = []
        names = {peer.public_key: peer.name for peer in self.config.peers if peer.name}
        for key in self.device.peer_keys():
            peer = self.device.peer_stats(key)
            allowed = peer.allowed_ips
            hosts = [net.network_address for net in allowed if net.prefixlen == net.max_prefixlen]
            v4 = [str(a) for a in hosts if a.version == 4]
            peers.append({
                "public_key": encode_key(peer.public_key),
                "name": names.get(peer.public_key),
                "connected": peer.has_session,
                "endpoint": format_endpoint(peer.endpoint),
                "allowed_ips": [str(net) for net in allowed],
                "address": v4[0] if v4 else (str(hosts[0]) if hosts else None),
                "addresses": [str(a) for a in hosts],
                "latest_handshake": None if peer.latest_handshake is None else int(peer.latest_handshake),
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "rx_packets": peer.rx_packets,
                "tx_packets": peer.tx_packets,
                "persistent_keepalive": peer.persistent_keepalive or None,
                "dropped": dict(peer.dropped),
                "rate_limit": peer.rate_limit,
                "access": None if peer.access is None else [str(net) for net in peer.access],
                **self.peer_status_extra(peer.public_key),
            })
        return {
            "interface": self.tun.name,
            "name": self.config.name,
            "role": self.role,
            "public_key": encode_key(self.device.public_key),
            "listen_port": self.udp.port,
            "addresses": [str(a) for a in self.current_addresses()],
            "mtu": self.device.mtu,
            "offloads": self.offloads_in_use(),
            "dropped": self.device.drops() | {f"udp_{k}": v for k, v in self.udp.errors.items()}
            | ({"tun_write_errors": self.tun.write_errors} if self.tun.write_errors else {}),
            "refused": dict(self.refused),
            "internal_errors": dict(self.faults.counts),
            **self.status_extra(),
            "peers": peers,
        }

    def offloads_in_use(self) -> list[str]:
        """What the kernel granted of the offloads asked for (--offloads)."""
        return (["coalesce"] if self.tun.vnet_header else []) + self.udp.offloads

    def current_addresses(self) -> list:
        return list(self.config.interface.addresses)

    def log_event(self, event: Event, now: float) -> None:
        """One info line per handshake, naming where it came from: a new client is one line (and
        its lease), not one per event, which at a thousand connects a second is the journal's
        cost and the server's. A roam shows in the next handshake's line; the event alone is debug."""
        kind = type(event)
        if kind is ControlReceived:
            return
        if kind is EndpointChanged:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("peer %s: endpoint is now %s", short_key(event.public_key), format_endpoint(event.endpoint))
            return
        if not self.peer_log.allow(event.public_key, kind.__name__, now):
            return
        key = short_key(event.public_key)
        if isinstance(event, HandshakeCompleted):
            endpoint = self.device.endpoint_of(event.public_key) if self.device.has_peer(event.public_key) else None
            log.info("peer %s: handshake complete (%s) at %s", key, "initiator" if event.initiator else "responder",
                     format_endpoint(endpoint))
        elif isinstance(event, HandshakeGaveUp):
            log.warning("peer %s: handshake did not complete after %d s", key, REKEY_ATTEMPT_TIME)
        elif isinstance(event, KeysExpired):
            log.info("peer %s: session keys expired and dropped", key)
        elif isinstance(event, CookieReceived):
            log.info("peer %s: is under load and sent a cookie; the next handshake carries mac2", key)

    def log_statistics(self) -> None:
        """SIGUSR2, as with OpenVPN: one line per peer and one for what was dropped."""
        wall_now = time.time()
        for key in self.device.peer_keys():
            peer = self.device.peer_stats(key)
            handshake = "never" if peer.latest_handshake is None else f"{wall_now - peer.latest_handshake:.0f}s ago"
            log.info(
                "peer %s: endpoint %s, handshake %s, rx %d B / %d pkts, tx %d B / %d pkts, dropped %s",
                short_key(peer.public_key), format_endpoint(peer.endpoint), handshake,
                peer.rx_bytes, peer.rx_packets, peer.tx_bytes, peer.tx_packets, _counts(peer.dropped),
            )
        log.info("device: dropped %s; udp errors %s; tun write errors %d", _counts(self.device.drops()),
                 _counts(self.udp.errors), self.tun.write_errors)


# Interface settings a running daemon cannot change (attribute -> the config key to name).
RESTART_SETTINGS = {
    "private_key": "PrivateKey", "listen_port": "ListenPort", "device": "Device", "addresses": "Address",
    "mtu": "MTU", "dns": "DNS", "dns_search": "DNS", "state_directory": "StateDirectory",
    "metrics_listen": "MetricsListen",
}


def _peer_settings(peer: PeerConfig) -> tuple:
    return (peer.preshared_key, tuple(peer.allowed_ips), peer.endpoint, peer.persistent_keepalive, peer.rate_limit,
            tuple(peer.access))


def refused_note(refused: dict[str, str]) -> str:
    """The tail of a reload's log line: a reload applied without its refused parts says so."""
    if not refused:
        return ""
    return f"; not in force, refused by the kernel: {', '.join(sorted(refused))}"


def _advice(what: str, code: int | None) -> str:
    """What an admin can do about a refused change, for the cases seen in the field."""
    if code == errno.EEXIST and what.startswith("route "):
        network = what.removeprefix("route ")
        return (f"; another device already routes {network} (see `ip route show {network}`), so its "
                f"traffic stays off the tunnel: remove that route, or take {network} out of "
                "AllowedIPs/PushRoute, then reload")
    if code == errno.EACCES and ":" in what:
        return "; is IPv6 disabled here (sysctl net.ipv6.conf.all.disable_ipv6)? Enable it, or stop pushing IPv6"
    if code == errno.EPERM:
        return "; the daemon lacks CAP_NET_ADMIN"
    return ""


def _earliest(*deadlines: float | None) -> float | None:
    return min((deadline for deadline in deadlines if deadline is not None), default=None)
