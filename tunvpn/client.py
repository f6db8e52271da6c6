"""`tunvpn client`: connect to a server, take the config it pushes, never give up.

The first [Peer] is the server.  Without `Address`/`AllowedIPs` the client
takes what the server pushes; with them it configures them at once and lets
a push fill in only what it left open.  A stock WireGuard server never
answers the config request, so after a few tries the client runs on its own
config (or says clearly that it needs one).
"""

from __future__ import annotations

import ipaddress
import logging
import time

from .config import Config, PeerConfig, resolve_endpoint, validate_push
from .daemon import Daemon, IPNetwork, Options, refused_note, short_key
from .io.dns import DnsError, DnsManager
from .protocol import control
from .protocol.control import AuthMethod, AuthState
from .protocol.device import ControlReceived, Device, Event, HandshakeCompleted, HandshakeGaveUp, KeysExpired

log = logging.getLogger("tunvpn")

REQUEST_INTERVAL = 1.0
REQUEST_ATTEMPTS = 5
STOCK_REQUEST_INTERVAL = 30.0  # keep asking now and then: the server may become a tunvpn one
RECONNECT_BACKOFF = (1.0, 5.0, 10.0, 20.0, 40.0, 60.0)  # seconds between fresh handshakes, capped
FULL_TUNNEL_MARK = 51820


class Client(Daemon):
    role = "client"

    def __init__(self, config: Config, options: Options) -> None:
        super().__init__(config, options)
        self.server: PeerConfig = config.peers[0]  # the config guarantees one
        self.pushed: control.ConfigPush | None = None
        self.mode = "waiting"  # waiting for a push | pushed | local (stock server or refused)
        self._request_id = 0
        self._requests_sent = 0
        self._next_request: float | None = None
        self._reconnect_at: float | None = None
        self._backoff_step = 0
        self._applied_addresses: list = []
        self._applied_routes: list[IPNetwork] = []
        self._full_tunnel: set[int] = set()  # IP versions whose default route goes into the tunnel
        self.dns: DnsManager | None = None
        self._dns_wanted: tuple[list[str], list[str]] | None = None  # what we last asked the helpers for
        self.wall_clock = time.time
        # The second factor, as the server last told it: None (nothing asked), waiting, checking (a code
        # is on its way), authorized, refused or rate_limited; a code's answer carries its attempt id.
        self.auth_state: str | None = None
        self._auth_until: int | None = None
        self._auth_retry_after: int | None = None
        self._attempt = 0
        self._answered = 0
        for peer in config.peers:
            self.device.set_peer(peer.public_key, endpoint=peer.endpoint_address, **self.peer_device_settings(peer))

    # --- daemon hooks -------------------------------------------------------------------------

    def build_device(self) -> Device:
        interface = self.config.interface
        return Device(interface.private_key, mtu=interface.mtu, load_threshold=self.options.load_threshold)

    def configure_link(self) -> None:
        interface = self.config.interface
        self.link.set_mtu(interface.mtu)
        for address in interface.addresses:
            self.link.add_address(address)
        networks = self._wanted_routes()
        self.set_routes(networks)
        self._maybe_full_tunnel(networks)
        if interface.dns or interface.dns_search:
            self._apply_dns(interface.dns, interface.dns_search)

    def started(self, now: float) -> None:
        for peer in self.config.peers:
            if peer.endpoint_address is not None:
                self.device.initiate(peer.public_key, now)

    def handle_event(self, event: Event, now: float) -> None:
        if event.public_key != self.server.public_key:
            return
        if isinstance(event, HandshakeCompleted):
            self._reconnect_at = None
            self._backoff_step = 0
            # Ask while we have no push; ask again when the server started the handshake, which
            # it does after a restart (it initiates to saved endpoints) and may have lost track of us.
            if (self.mode == "waiting" or not event.initiator) and self._next_request is None:
                self._requests_sent = 0
                self._next_request = now
        elif isinstance(event, (HandshakeGaveUp, KeysExpired)):
            self._schedule_reconnect(now, reresolve=True)
        elif isinstance(event, ControlReceived):
            self._handle_control(event.payload, now)

    def tick(self, now: float) -> float | None:
        if self._next_request is not None and now >= self._next_request:
            self._send_request(now)
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect(now)
        deadlines = [d for d in (self._next_request, self._reconnect_at) if d is not None]
        return min(deadlines) if deadlines else None

    def say_goodbye(self, now: float) -> None:
        if self.mode == "pushed" and self.device.has_session(self.server.public_key):
            self.device.send_to_peer(self.server.public_key, [control.encode(control.Goodbye("client stopping"))], now)
        self._revert_dns()

    def status_extra(self) -> dict:
        pushed = None
        if self.pushed is not None:
            pushed = {
                "from_server": True,
                "addresses": [str(a) for a in self.pushed.addresses],
                "routes": [str(n) for n in self.pushed.routes],
                "dns": [str(d) for d in self.pushed.dns],
                "search": list(self.pushed.search),
                "mtu": self.pushed.mtu,
                "keepalive": self.pushed.keepalive,
            }
        second_factor = None if self.auth_state is None else {
            "state": self.auth_state, "until": self._auth_until, "retry_after": self._auth_retry_after,
            "attempt": self._attempt, "answered": self._answered}
        return {"client_to_client": None, "pushed": pushed, "config_source": self.mode, "second_factor": second_factor}

    def summary(self) -> str:
        line = super().summary()
        if self.auth_state not in (None, "authorized"):
            line += f"; waiting for second factor (tunvpn login {self.config.name})"
        return line

    def handle_request(self, request: dict) -> dict:
        if request.get("command") == "login":
            return self._login(request.get("code"))
        return super().handle_request(request)

    def peer_status_extra(self, public_key: bytes) -> dict:
        return {"tunvpn": public_key == self.server.public_key and self.mode == "pushed"}

    def current_addresses(self) -> list:
        return [*self.config.interface.addresses, *self._applied_addresses]

    # --- asking the server -------------------------------------------------------------------------

    def _send_request(self, now: float) -> None:
        """REQUEST_ATTEMPTS requests a second apart; unanswered, the client runs on its own config
        and goes on asking the same request at doubling intervals up to STOCK_REQUEST_INTERVAL.
        A server under a flood may lose five in a row; a stock server drops one small packet now
        and then, and a tunvpn server that comes back is heard from within half a minute."""
        if self._requests_sent == 0:
            self._request_id = self._request_id % 0xFFFF + 1
        elif self._requests_sent == REQUEST_ATTEMPTS:
            self._fall_back_to_local()
        self._requests_sent += 1
        beyond = self._requests_sent - REQUEST_ATTEMPTS
        wait = REQUEST_INTERVAL * 2 ** min(beyond, 5) if beyond > 0 else REQUEST_INTERVAL
        self._next_request = now + min(wait, STOCK_REQUEST_INTERVAL)
        # The addresses held from the last push: a server that lost its leases gives them back.
        request = control.encode(control.ConfigRequest(self._request_id, list(self._applied_addresses)))
        self.device.send_to_peer(self.server.public_key, [request], now)

    def _fall_back_to_local(self) -> None:
        if self.mode != "waiting":
            return
        self.mode = "local"
        interface = self.config.interface
        if interface.addresses and self.server.allowed_ips:
            log.info("server %s did not answer the config request (a stock WireGuard server?); "
                     "running on the local Address and AllowedIPs", short_key(self.server.public_key))
        else:
            missing = " and ".join(k for k, v in (("Address", interface.addresses),
                                                 ("AllowedIPs", self.server.allowed_ips)) if not v)
            log.error("server %s did not answer the config request (a stock WireGuard server?) and %s "
                      "lacks %s: set them to use this server", short_key(self.server.public_key),
                      self.config.path, missing)

    def _handle_control(self, payload: bytes, now: float) -> None:
        server = self.server.public_key
        try:
            message = control.decode(payload)
        except control.ControlError as exc:
            self.device.count_drop(server, "bad_control_message")
            if self.peer_log.allow(self.server.public_key, "malformed control message", now):
                log.warning("server sent a malformed control message: %s", exc)
            return
        if isinstance(message, control.ConfigPush):
            if message.request_id not in (0, self._request_id):
                self.device.count_drop(server, "stale_config_push")  # a late answer to an older request
                return
            self._next_request = None
            reasons = validate_push(message, self.config.interface)
            if reasons:  # refused whole: half a config is worse than the one in use
                self.device.count_drop(server, "invalid_config_push")
                if self.peer_log.allow(self.server.public_key, "invalid config push", now):
                    log.warning("refused the server's config push, keeping the config in use: %s", "; ".join(reasons))
                return
            self._apply_push(message)
        elif isinstance(message, control.ConfigRefused):
            self._next_request = now + STOCK_REQUEST_INTERVAL
            self._requests_sent = 0
            log.error("server refused to configure this client: %s", message.reason)
        elif isinstance(message, control.Goodbye):
            log.info("server said goodbye (%s); reconnecting", message.reason or "no reason")
            self.device.drop_sessions(self.server.public_key)
            if self.mode == "pushed":
                self.mode = "waiting"  # ask again once the server is back; keep the applied config meanwhile
            self._backoff_step = 0
            self._schedule_reconnect(now, reresolve=False)
        elif isinstance(message, control.AuthStatus):
            self._auth_status(message)
        elif message is None:
            self.device.count_drop(server, "ignored_control_message")

    # --- the second factor -------------------------------------------------------------------------

    def _login(self, code: object) -> dict:
        """`tunvpn login`: hand a code to the server; its answer shows in the status under this attempt."""
        if not isinstance(code, str):
            return {"error": "login needs a code"}
        attempt = self._attempt % control.MAX_REQUEST_ID + 1
        try:
            payload = control.encode(control.AuthCode(attempt, AuthMethod.TOTP, code))
        except control.ControlError as exc:
            return {"error": f"not a code: {exc}"}
        self._attempt = attempt
        self._set_auth("checking")
        self.device.send_to_peer(self.server.public_key, [payload], time.monotonic())
        return {"attempt": attempt}

    def _auth_status(self, status: control.AuthStatus) -> None:
        if status.method != AuthMethod.TOTP:
            self.device.count_drop(self.server.public_key, "ignored_control_message")
            return
        answers_code = self.auth_state == "checking" and status.request_id == self._attempt
        if self.auth_state == "checking" and not answers_code and status.state == AuthState.REQUIRED:
            return  # the answer to a config request overtaken by a code: the code's answer is the news
        if answers_code:
            self._answered = status.request_id
        self._auth_retry_after = status.seconds if status.state == AuthState.RATE_LIMITED else None
        self._auth_until = (int(self.wall_clock()) + (status.seconds or 0)
                            if status.state == AuthState.AUTHORIZED else None)
        self._set_auth(_AUTH_STATES[status.state])

    def _set_auth(self, state: str | None) -> None:
        """One log line per change, so the journal says when traffic stopped and started again."""
        if state == self.auth_state:
            return
        self.auth_state = state
        self.status_changed()
        if state == "waiting":
            log.warning("waiting for second factor: the server holds this client's traffic until "
                        "`tunvpn login %s` gives it a code", self.config.name)
        elif state == "authorized":
            log.info("second factor accepted; authorized until %s",
                     time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self._auth_until)))
        elif state == "refused":
            log.warning("second factor refused (a wrong or already used code); still waiting for second factor")
        elif state == "rate_limited":
            log.warning("second factor: too many codes; the server takes the next in %s s", self._auth_retry_after)

    # --- applying a push --------------------------------------------------------------------------

    def _apply_push(self, push: control.ConfigPush) -> None:
        """Apply a push, or the difference to the last one: what it no longer has is taken back."""
        self.mode = "pushed"
        if self.pushed is not None and _same_push(push, self.pushed):
            return
        first = self.pushed is None
        self.pushed = push
        interface = self.config.interface
        local_families = {a.version for a in interface.addresses}
        wanted = [a for a in push.addresses if a.version not in local_families]
        self._set_pushed_addresses(wanted)
        if push.mtu and not interface.mtu_configured and push.mtu != self.device.mtu:
            if self.apply_or_report(f"pushed MTU {push.mtu}", lambda: self.link.set_mtu(push.mtu)):
                self.device.set_mtu(push.mtu)
        self._applied_routes = list(push.routes)
        self._install_server_peer()
        routes = self._wanted_routes()
        self.set_routes(routes)
        self._maybe_full_tunnel(routes)
        if not (interface.dns or interface.dns_search):
            self._apply_dns(push.dns, push.search)
        log.info("%s config from the server: addresses %s, routes %s, dns %s, mtu %s, keepalive %s",
                 "applied" if first else "updated",
                 ", ".join(map(str, push.addresses)) or "none", ", ".join(map(str, push.routes)) or "none",
                 ", ".join(map(str, [*push.dns, *push.search])) or "none", push.mtu, push.keepalive)

    def _set_pushed_addresses(self, wanted: list) -> None:
        """Put exactly the pushed addresses on the tun; one the kernel refuses (IPv6 disabled)
        is reported and the others still apply."""
        for address in self._applied_addresses:
            if address not in wanted:
                what = f"pushed address {address}"
                if what in self.refused:
                    self.forget_refusal(what)
                else:
                    self.apply_or_report(f"removing {what}", lambda: self.link.remove_address(address))
        for address in wanted:
            what = f"pushed address {address}"
            if address not in self._applied_addresses or what in self.refused:
                self.apply_or_report(what, lambda: self.link.add_address(address))
        self._applied_addresses = wanted

    def _wanted_routes(self) -> list[IPNetwork]:
        """Every network routed into the tun: each peer's AllowedIPs plus what the server pushed."""
        return [*(net for peer in self.config.peers for net in peer.allowed_ips), *self._applied_routes]

    def _install_server_peer(self) -> None:
        """The server peer as configured, plus the pushed routes and keepalive where the config is silent."""
        keepalive = self.server.persistent_keepalive or (self.pushed.keepalive or 0 if self.pushed else 0)
        self.device.set_peer(self.server.public_key, preshared_key=self.server.preshared_key,
                             allowed_ips=[*self.server.allowed_ips, *self._applied_routes],
                             endpoint=self.server.endpoint_address, persistent_keepalive=keepalive)

    def _maybe_full_tunnel(self, networks: list[IPNetwork]) -> None:
        """A /0 among the networks: route that whole family into the tunnel (once per family)."""
        families = sorted({net.version for net in networks if net.prefixlen == 0} - self._full_tunnel)
        if not families:
            return
        self.udp.set_fwmark(FULL_TUNNEL_MARK)
        for family in families:
            if self.apply_or_report(f"IPv{family} full tunnel", lambda: self.link.add_full_tunnel(
                    family, table=FULL_TUNNEL_MARK, fwmark=FULL_TUNNEL_MARK)):
                self._full_tunnel.add(family)
        families = [family for family in families if family in self._full_tunnel]
        if not families:
            return
        log.info("full tunnel: IPv%s default route through %s, UDP to the server marked %d",
                 " and IPv".join(map(str, families)), self.tun.name, FULL_TUNNEL_MARK)

    def _apply_dns(self, servers: list, search: list[str]) -> None:
        """Make these the tun's DNS settings (replacing earlier ones); reverted on any exit.

        resolvectl and resolvconf run on the system worker, one change at a time, so `self.dns`
        is only ever used from there; a change queued behind another replaces it.
        """
        wanted = ([str(server) for server in servers], list(search))
        if wanted == self._dns_wanted:
            return
        self._dns_wanted = wanted
        if self.dns is None:
            self.dns = DnsManager(self.tun.name)
            self.cleanup.callback(self._revert_dns)
        dns, exclusive = self.dns, bool(self._full_tunnel)
        self.system.submit("applying DNS settings", lambda: dns.apply(*wanted, exclusive=exclusive),
                           lambda summary, error: _log_dns("apply", wanted, summary, error), key="dns")

    def _revert_dns(self) -> None:
        """Take our DNS settings back (at shutdown); a failing helper is logged, never fatal."""
        wanted, self._dns_wanted = self._dns_wanted, None
        if self.dns is None or wanted is None:
            return
        self.system.submit("reverting DNS settings", self.dns.revert,
                           lambda _, error: _log_dns("revert", wanted, None, error), key="dns")

    # --- reconnecting ----------------------------------------------------------------------------

    def _schedule_reconnect(self, now: float, reresolve: bool) -> None:
        delay = RECONNECT_BACKOFF[min(self._backoff_step, len(RECONNECT_BACKOFF) - 1)]
        self._backoff_step += 1
        self._reconnect_at = now + delay
        if reresolve:
            self._reresolve()

    def _reconnect(self, now: float) -> None:
        self._reconnect_at = None
        if not self.device.has_session(self.server.public_key):
            self.device.initiate(self.server.public_key, now)
            self._schedule_reconnect(now, reresolve=False)

    def _reresolve(self) -> None:
        """A DNS endpoint may have moved: look it up again when handshakes keep failing."""
        if self.server.endpoint is None:
            return
        host, port = self.server.endpoint
        try:
            ipaddress.ip_address(host)
            return  # a literal address never moves
        except ValueError:
            pass
        self.resolver.submit(f"resolving {host}", lambda: resolve_endpoint(host, port),
                             lambda address, error: self._resolved(host, address, error), key="reresolve")

    def _resolved(self, host: str, address: tuple | None, error: BaseException | None) -> None:
        if isinstance(error, OSError):  # socket.gaierror included
            log.warning("cannot resolve the server's endpoint %s: %s", host, error)
            return
        if error is not None:
            raise error
        if address != self.device.peer_stats(self.server.public_key).endpoint:
            log.info("server endpoint %s now resolves to %s", host, address[0])
            self.device.set_endpoint(self.server.public_key, address)

    # --- reload -----------------------------------------------------------------------------------

    def apply_reload(self, new: Config, now: float) -> None:
        added, removed, changed = self.diff_peers(new)
        if new.peers and new.peers[0].public_key != self.server.public_key:
            log.warning("reload: the server ([Peer] 1) changed; restart the client to switch servers")
            return
        self.config = new
        self.server = new.peers[0]
        for public_key in removed:
            self.device.remove_peer(public_key)
        for peer in [*added, *changed]:
            if peer.public_key == self.server.public_key:
                self._install_server_peer()
            else:
                self.device.set_peer(peer.public_key, endpoint=peer.endpoint_address, **self.peer_device_settings(peer))
        self.set_routes(self._wanted_routes())
        log.info("reloaded %s: %d peer(s) added, %d removed, %d changed%s", new.path, len(added), len(removed),
                 len(changed), refused_note(self.refused))


_AUTH_STATES = {AuthState.AUTHORIZED: "authorized", AuthState.REQUIRED: "waiting", AuthState.REFUSED: "refused",
                AuthState.RATE_LIMITED: "rate_limited", AuthState.NOT_REQUIRED: None}


def _same_push(a: control.ConfigPush, b: control.ConfigPush) -> bool:
    """Two pushes that differ only in the request id they answer."""
    return (a.addresses, a.routes, a.dns, a.search, a.mtu, a.keepalive) == (
        b.addresses, b.routes, b.dns, b.search, b.mtu, b.keepalive)


def _log_dns(action: str, wanted: tuple[list[str], list[str]], summary: str | None, error: BaseException | None) -> None:
    if isinstance(error, DnsError):
        log.warning("dns: could not %s %s: %s", action, ", ".join(wanted[0] + wanted[1]), error)
    elif error is not None:
        raise error
    elif summary:
        log.info("dns: %s", summary)
