"""`tunvpn server`: one tun for all clients, an address pool, pushed config, saved endpoints,
a second factor for the peers that need one, and invites that enroll new peers."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import time
from pathlib import Path

from .config import Config, PeerConfig, is_peer_name, load_config, public_endpoint, server_subnets
from .daemon import Daemon, IPNetwork, Options, PeerLogLimit, refused_note, short_key
from .gate import PeerGate
from .invites import (DEFAULT_LIFETIME, MAX_LIFETIME, MAX_OPEN_INVITES, MAX_USES, EnrollmentLimit, Invite,
                      load_invites, save_invites)
from .invitetoken import MAX_ENDPOINTS
from .keys import InvalidKey, decode_key, encode_key
from .peersdir import load_enrolled, peer_file, peer_text, peers_directory, remove_peer_file, with_enrolled, write_peer_file
from .pool import AddressPool, Lease, PoolExhausted
from .protocol import control
from .protocol.control import AuthMethod, AuthState, EnrollState
from .protocol.device import ControlReceived, Device, EndpointChanged, Event, HandshakeCompleted
from .secondfactor import HOLD_REASON, SecondFactor, TotpPeer, Verdict
from .state import State, StateStore, endpoint_from_text, endpoint_to_text

log = logging.getLogger("tunvpn")

STATE_SAVE_DELAY = 1.0  # endpoints and leases change in bursts (roaming, a restart): save at most this often
STATE_RETRY_DELAY = 5.0  # a save that failed (disk full, read-only) is tried again this often until it works
REQUESTS_PER_PEER_INTERVAL = 0.2  # a peer asking more often than this is ignored (and counted)
INVITE_HOLD = "invite_peer"  # the drop reason of an invite's packets: it may enroll and nothing else


class Server(Daemon):
    role = "server"

    def __init__(self, config: Config, options: Options) -> None:
        super().__init__(config, options)
        self.peers_dir = peers_directory(self.state_directory)
        config = self.config = _with_enrolled_peers(config, self.peers_dir)
        self.store = StateStore(self.state_directory)
        self.state = self.store.load()
        for problem in self.store.problems:
            log.warning("state: %s", problem)
        self._save_at: float | None = None
        self._save_failing = False  # said once per outage, not every retry
        self._configured = {peer.public_key: peer for peer in config.peers}
        self.pool = self._build_pool(config, self.state.leases)
        self.tunvpn_peers: set[bytes] = set()
        self._last_request: dict[bytes, float] = {}
        self.wall_clock = time.time  # second-factor deadlines must mean the same after a restart
        self.gate = PeerGate(self.device)
        self.second_factor = SecondFactor(self.state.second_factor)
        self._held_log = PeerLogLimit(burst=1, window=3600.0)  # a stock peer rekeys every 2 minutes
        self._sync_peers(config.peers, endpoints=True)
        self._sync_second_factor()
        self.invites: dict[bytes, Invite] = {}
        self._enrolling: set[bytes] = set()  # invites whose new peer is being written to disk
        self._writing: dict[bytes, str] = {}  # key -> name of each peer whose file is being written
        self.enroll_limit = EnrollmentLimit()
        self._peer_journal: list[_PeerChange] = []
        self._invites_save_failing = False
        self._load_invites()

    @property
    def state_directory(self) -> Path:
        return self.options.state_dir or Path(self.config.interface.state_directory)

    # --- addresses ----------------------------------------------------------------------

    def _build_pool(self, config: Config, leases: dict[bytes, Lease]) -> AddressPool:
        """A pool for `config` that keeps every still-valid lease, minus the families a peer now
        has a fixed address for, so a peer never holds two addresses of one family."""
        reserved = [net for peer in config.peers for net in peer.allowed_ips]
        pool = AddressPool(config.interface.addresses, config.interface.pools, reserved)
        kept = dict(leases)
        for peer in config.peers:
            fixed = pool.fixed_lease(peer.allowed_ips)
            lease = kept.get(peer.public_key)
            if fixed is None or lease is None:
                continue
            for address in fixed.addresses:
                lease = lease.with_address(address.version, None)
            if lease.addresses:
                kept[peer.public_key] = lease
            else:
                del kept[peer.public_key]
        for warning in pool.restore(kept):
            log.warning("leases: %s", warning)
        if pool.leases() != leases:
            self.state.leases = pool.leases()
            self._schedule_save(0.0)
        return pool

    @staticmethod
    def _pool_families(pool: AddressPool, fixed: Lease | None) -> list[int]:
        """The families a peer takes from the pool: those without a fixed address."""
        return [version for version in pool.subnets if fixed is None or fixed.get(version) is None]

    def _peer_addresses(self, public_key: bytes, allowed_ips) -> list:
        """A peer's tunnel addresses: fixed ones from its AllowedIPs, the rest from its lease."""
        fixed = self.pool.fixed_lease(allowed_ips)
        lease = self.pool.lease_of(public_key)
        addresses = list(fixed.addresses) if fixed is not None else []
        if lease is not None:
            addresses += [lease.get(v) for v in self._pool_families(self.pool, fixed) if lease.get(v) is not None]
        return addresses

    def _sync_peers(self, peers, endpoints: bool) -> None:
        """Install peers in the device with their config plus their leased addresses; sessions survive."""
        for peer in peers:
            addresses = self._peer_addresses(peer.public_key, peer.allowed_ips)
            leased = [ipaddress.ip_network(a.ip) for a in addresses if ipaddress.ip_network(a.ip) not in peer.allowed_ips]
            self.device.set_peer(peer.public_key, endpoint=peer.endpoint_address if endpoints else None,
                                 **self.peer_device_settings(peer, leased))
            self.device.set_policy(peer.public_key, *self._policy_of(peer), exempt=self._subnets())

    def _policy_of(self, peer) -> tuple[int | None, list[IPNetwork] | None]:
        """(rate limit, access rules) in force for a peer: its own, else the server's defaults."""
        interface = self.config.interface
        rate = peer.rate_limit if peer.rate_limit is not None else interface.default_rate_limit
        return rate or None, peer.access or interface.default_access or None

    def _lease(self, public_key: bytes, families: list[int]) -> Lease:
        """Lease from the pool; when it is full, take back the lease of a peer no longer configured.

        Leases of removed peers are kept (a peer added back gets its old address) until the
        pool needs them: then they go one at a time, in the pool's order.
        """
        while True:
            try:
                return self.pool.lease(public_key, families)
            except PoolExhausted:
                stale = next((key for key, lease in self.pool.leases().items() if key not in self._configured
                              and any(lease.get(version) for version in families)), None)
                if stale is None:
                    raise
                self.pool.release(stale)
                self.state.leases.pop(stale, None)
                self.state.endpoints.pop(stale, None)
                log.info("reclaimed the address of removed peer %s", short_key(stale))

    def _subnets(self) -> list[IPNetwork]:
        return server_subnets(self.config.interface.addresses)

    def _routed_outside_subnets(self, peers) -> list[IPNetwork]:
        """Peer networks the tun's own addresses do not cover (e.g. a site behind a peer)."""
        subnets = self._subnets()
        return [net for peer in peers for net in peer.allowed_ips
                if not any(net.version == s.version and net.subnet_of(s) for s in subnets)]

    def _addresses_for(self, public_key: bytes, held: list | None = None) -> list:
        """What to push as the client's address: its fixed address, else a pool lease. A client
        without a lease here that `held` addresses from an earlier push gets those back if they are
        free (the state file was lost), instead of whatever is lowest: another client's, maybe."""
        peer = self._configured[public_key]
        fixed = self.pool.fixed_lease(peer.allowed_ips)
        families = self._pool_families(self.pool, fixed)
        if families:
            before = self.pool.lease_of(public_key)
            if before is None and held:
                self.pool.restore({public_key: _lease_of(held, families)})  # what is taken or unusable stays out
            lease = self._lease(public_key, families)
            if lease != before:
                self.state.leases[public_key] = lease
                # Batched like endpoints: thousands of clients connecting at once cost one save a
                # second, not one each (a client holds its pushed address and names it after a crash).
                self._schedule_save(time.monotonic() + STATE_SAVE_DELAY)
                for address in lease.addresses:
                    self.device.add_allowed_ip(public_key, _host_network(address))
                log.info("peer %s: leased %s", short_key(public_key), _describe_lease(lease))
        return self._peer_addresses(public_key, peer.allowed_ips)

    # --- daemon hooks -------------------------------------------------------------------

    def build_device(self) -> Device:
        interface = self.config.interface
        device = Device(interface.private_key, mtu=interface.mtu, load_threshold=self.options.load_threshold)
        device.set_forwarding(bool(interface.client_to_client))
        return device

    def configure_link(self) -> None:
        interface = self.config.interface
        self.link.set_mtu(interface.mtu)
        for address in interface.addresses:
            self.link.add_address(address)
        self.set_routes(self._routed_outside_subnets(self.config.peers))

    def started(self, now: float) -> None:
        """Initiate to every client's last endpoint, so clients recover at once after a restart."""
        for public_key, text in self.state.endpoints.items():
            if not self.device.has_peer(public_key):
                continue
            if self.device.peer_stats(public_key).endpoint is None:
                self.device.set_endpoint(public_key, endpoint_from_text(text))
            self.device.initiate(public_key, now)
            log.info("peer %s: initiating to its last endpoint %s", short_key(public_key), text)

    def handle_event(self, event: Event, now: float) -> None:
        if isinstance(event, ControlReceived):
            self._handle_control(event.public_key, event.payload, now)
        elif isinstance(event, EndpointChanged) and event.public_key in self._configured:
            self.state.endpoints[event.public_key] = endpoint_to_text(event.endpoint)
            self._schedule_save(now + STATE_SAVE_DELAY)
        elif isinstance(event, HandshakeCompleted) and self.gate.is_held(event.public_key, HOLD_REASON):
            if self._held_log.allow(event.public_key, "second factor", now):
                log.warning("peer %s: connected, but its traffic is dropped until it presents a second factor "
                            "(TOTP = yes): `tunvpn login` on its tunvpn client; a stock WireGuard peer cannot "
                            "send one, so none of its traffic passes", short_key(event.public_key))

    def tick(self, now: float) -> float | None:
        expiry = self._end_sessions(now)
        invites_end = self._end_invites(now)
        if self._save_at is not None and now >= self._save_at:
            self._save()
        return min((d for d in (self._save_at, expiry, invites_end) if d is not None), default=None)

    def say_goodbye(self, now: float) -> None:
        goodbye = control.encode(control.Goodbye("server shutting down"))
        for public_key in self.tunvpn_peers:
            if self.device.has_peer(public_key) and self.device.has_session(public_key):
                self.device.send_to_peer(public_key, [goodbye], now)
        if self._save_at is not None:
            self._save()

    def summary(self) -> str:
        held = sum(1 for key in self.device.peer_keys() if self.gate.is_held(key, HOLD_REASON))
        return super().summary() + (f"; {held} waiting for second factor" if held else "")

    def status_extra(self) -> dict:
        pool = {str(version): {"size": size, "leased": leased} for version, (size, leased) in self.pool.usage().items()}
        return {"client_to_client": bool(self.config.interface.client_to_client), "pushed": None, "pool": pool,
                "invites": [_invite_status(invite) for invite in self.invites.values()],
                "enrolled": sorted(peer.name for peer in self.config.peers if peer.source is not None)}

    def handle_request(self, request: dict) -> dict:
        command = request.get("command")
        handler = {"invite": self._create_invite, "add-peer": self._add_stock_peer, "revoke": self._revoke,
                   "peers": lambda _: self._list_peers()}.get(command) if isinstance(command, str) else None
        return handler(request) if handler else super().handle_request(request)

    def load_config_file(self) -> Config:
        """On reload, beside the loop: the main config plus the peers directory, as at start."""
        return _with_enrolled_peers(load_config(self.config.path, role=self.role), self.peers_dir)

    def peer_status_extra(self, public_key: bytes) -> dict:
        invite = self.invites.get(public_key)
        if invite is not None:
            return {"tunvpn": False, "second_factor": None, "invite": _invite_status(invite)}
        second_factor = None
        if self.second_factor.required(public_key):
            until = self.second_factor.authorized_until(public_key, self.wall_clock())
            second_factor = {"method": "totp", "authorized": until is not None, "until": until}
        return {"tunvpn": public_key in self.tunvpn_peers, "second_factor": second_factor}

    # --- the second factor ----------------------------------------------------------------

    def _sync_second_factor(self) -> list[bytes]:
        """Who needs a code now, each held unless authorized; the peers whose need changed."""
        session = self.config.interface.totp_session or 0
        before = {key for key in self.device.peer_keys() if self.second_factor.required(key)}
        if self.second_factor.configure(TotpPeer(peer.public_key, peer.totp_secret, peer.totp_session or session)
                                        for peer in self.config.peers if peer.totp):
            self._schedule_save(0.0)
        wall = self.wall_clock()
        for peer in self.config.peers:
            key = peer.public_key
            if self.second_factor.required(key) and self.second_factor.authorized_until(key, wall) is None:
                self.gate.hold(key, HOLD_REASON)
            else:
                self.gate.release(key, HOLD_REASON)
        return [peer.public_key for peer in self.config.peers
                if (peer.public_key in before) != self.second_factor.required(peer.public_key)]

    def _auth_status(self, public_key: bytes, request_id: int) -> list[bytes]:
        """Where a peer stands, for a tunvpn client to show; nothing for a peer that needs no code."""
        if not self.second_factor.required(public_key):
            return []
        wall = self.wall_clock()
        until = self.second_factor.authorized_until(public_key, wall)
        verdict = Verdict(AuthState.REQUIRED) if until is None else Verdict(AuthState.AUTHORIZED, until - int(wall))
        return [control.encode(control.AuthStatus(request_id, AuthMethod.TOTP, *verdict))]

    def _check_code(self, public_key: bytes, message: control.AuthCode, now: float) -> None:
        key = short_key(public_key)
        verdict = (self.second_factor.check(public_key, message.code, self.wall_clock(), now)
                   if message.method == AuthMethod.TOTP else Verdict(AuthState.NOT_REQUIRED))
        if verdict.state == AuthState.AUTHORIZED:
            self.gate.release(public_key, HOLD_REASON)
            self._schedule_save(0.0)
            self.status_changed()
            log.info("peer %s: second factor accepted; authorized for %d s", key, verdict.seconds)
        elif verdict.state in (AuthState.REFUSED, AuthState.RATE_LIMITED):
            reason = "second_factor_refused" if verdict.state == AuthState.REFUSED else "second_factor_rate_limited"
            self.device.count_drop(public_key, reason)
            if self.peer_log.allow(public_key, reason, now):
                log.warning("peer %s: second factor %s", key, "refused (a wrong or already used code)"
                            if verdict.state == AuthState.REFUSED else f"guess refused: too many, next in {verdict.seconds} s")
        self.device.send_to_peer(public_key, [control.encode(control.AuthStatus(
            message.request_id, message.method, *verdict))], now)

    def _end_sessions(self, now: float) -> float | None:
        """Hold the peers whose authorization ran out, and tell them; the monotonic time of the next end."""
        wall = self.wall_clock()
        for public_key in self.second_factor.expire(wall):
            self.gate.hold(public_key, HOLD_REASON)
            self._schedule_save(now)
            self.status_changed()
            log.info("peer %s: second factor session ended; its traffic waits for a new code", short_key(public_key))
            if public_key in self.tunvpn_peers and self.device.has_session(public_key):
                self.device.send_to_peer(public_key, self._auth_status(public_key, 0), now)
        ends = self.second_factor.next_expiry()
        return None if ends is None else now + max(0.0, ends - wall)

    # --- state ------------------------------------------------------------------------------

    def _schedule_save(self, at: float) -> None:
        if self._save_at is None or at < self._save_at:
            self._save_at = at

    def _save(self) -> None:
        """Write a copy of the state beside the loop (fsyncs are slow); a newer save replaces a queued one."""
        self._save_at = None
        snapshot = State(dict(self.state.leases), dict(self.state.endpoints), dict(self.state.second_factor))
        self.system.submit("saving state", lambda: self.store.save(snapshot), self._saved, key="state")

    def _saved(self, written: bool | None, error: BaseException | None) -> None:
        """A failed save is retried: the leases it holds must reach the disk once it has room again."""
        if isinstance(error, OSError):
            if not self._save_failing:
                log.error("cannot save state in %s: %s; trying again every %.0f s", self.state_directory,
                          error.strerror or error, STATE_RETRY_DELAY)
            self._save_failing = True
            self._schedule_save(time.monotonic() + STATE_RETRY_DELAY)
        elif error is not None:
            raise error
        elif self._save_failing:
            self._save_failing = False
            log.info("saved state in %s again", self.state_directory)

    # --- the control extension -------------------------------------------------------------

    def _handle_control(self, public_key: bytes, payload: bytes, now: float) -> None:
        if not self.device.has_peer(public_key):
            return
        try:
            message = control.decode(payload)
        except control.ControlError as exc:
            self.device.count_drop(public_key, "bad_control_message")
            if self.peer_log.allow(public_key, "bad control message", now):
                log.debug("peer %s: bad control message: %s", short_key(public_key), exc)
            return
        if public_key in self.invites:
            self._invite_control(public_key, message, now)
        elif message is None:
            self.device.count_drop(public_key, "ignored_control_message")
        elif isinstance(message, control.ConfigRequest):
            last = self._last_request.get(public_key)
            if last is not None and now - last < REQUESTS_PER_PEER_INTERVAL:
                self.device.count_drop(public_key, "control_rate_limited")
                return
            self._last_request[public_key] = now
            self.tunvpn_peers.add(public_key)
            answer = self._encoded_answer(public_key, message.request_id, message.addresses)
            self.device.send_to_peer(public_key, [answer, *self._auth_status(public_key, message.request_id)], now)
        elif isinstance(message, control.AuthCode):
            self.tunvpn_peers.add(public_key)
            self._check_code(public_key, message, now)
        elif isinstance(message, control.Goodbye):
            if self.peer_log.allow(public_key, "goodbye", now):
                log.info("peer %s: said goodbye (%s)", short_key(public_key), message.reason or "no reason")
            self.device.drop_sessions(public_key)
        else:
            self.device.count_drop(public_key, "unexpected_control_message")

    def _encoded_answer(self, public_key: bytes, request_id: int, held: list | None = None) -> bytes:
        answer = self._answer(public_key, request_id, held)
        try:
            return control.encode(answer)
        except control.ControlError as exc:  # check-config guards against this; never crash on it
            log.error("cannot push config to peer %s: %s", short_key(public_key), exc)
            return control.encode(control.ConfigRefused(request_id, "the server's push does not fit a message"))

    def _answer(self, public_key: bytes, request_id: int, held: list | None = None):
        try:
            addresses = self._addresses_for(public_key, held)
        except PoolExhausted as exc:
            log.warning("peer %s: no address to give: %s", short_key(public_key), exc)
            return control.ConfigRefused(request_id, f"address pool exhausted: {exc}")
        interface = self.config.interface
        return control.ConfigPush(
            request_id=request_id,
            addresses=addresses,
            routes=[*self._subnets(), *interface.push_routes],
            dns=list(interface.push_dns),
            search=list(interface.push_dns_search),
            mtu=interface.mtu,
            keepalive=interface.push_keepalive,
        )

    # --- invites and enrolled peers ----------------------------------------------------------

    def _load_invites(self) -> None:
        invites, problems = load_invites(self.state_directory)
        for problem in problems:
            log.warning("invites: %s", problem)
        wall = int(self.wall_clock())
        for invite in invites.values():
            if invite.ends > wall and invite.public_key not in self._configured:
                self.invites[invite.public_key] = invite
                self._install_invite(invite)
        if len(self.invites) != len(invites):
            self._save_invites()

    def _install_invite(self, invite: Invite) -> None:
        """An invite is a peer without allowed IPs, held to control messages: it can only enroll."""
        self.device.set_peer(invite.public_key, preshared_key=invite.preshared_key, allowed_ips=())
        self.gate.hold(invite.public_key, INVITE_HOLD)

    def _drop_invite(self, public_key: bytes, why: str) -> None:
        invite = self.invites.pop(public_key)
        self.device.remove_peer(public_key)
        self.gate.forget(public_key)
        self._save_invites()
        self.status_changed()
        log.info("invite %s: %s (%d of %d use(s) spent)", invite.name, why, len(invite.enrolled), invite.uses)

    def _end_invites(self, now: float) -> float | None:
        """Forget the invites that expired or were used up; the monotonic time of the next end."""
        wall = int(self.wall_clock())
        for invite in [invite for invite in self.invites.values() if invite.ends <= wall]:
            self._drop_invite(invite.public_key, "used up" if invite.uses_left == 0 else "expired")
        ends = min((invite.ends for invite in self.invites.values()), default=None)
        return None if ends is None else now + max(0.0, ends - self.wall_clock())

    def _save_invites(self) -> None:
        snapshot, directory = dict(self.invites), self.state_directory
        self.system.submit("saving invites", lambda: save_invites(directory, snapshot), self._invites_saved,
                           key="invites")

    def _invites_saved(self, _: object, error: BaseException | None) -> None:
        if isinstance(error, OSError):
            log.error("cannot save the invites in %s: %s; a restart would lose the changes since the last save",
                      self.state_directory, error.strerror or error)
        elif error is not None:
            raise error

    def _name_taken(self, name: str) -> bool:
        return any(peer.name == name for peer in self.config.peers) or name in self._writing.values() or any(
            invite.peer_name(index) == name for invite in self.invites.values() for index in range(invite.uses))

    def _key_taken(self, public_key: bytes) -> bool:
        return (public_key in self._configured or public_key in self.invites or public_key in self._writing
                or public_key == self.device.public_key)

    def _create_invite(self, request: dict) -> dict:
        """`tunvpn invite`: the CLI made the key pair and sends the public key and PSK only."""
        try:
            name = _checked_name(request.get("name"))
            public_key = decode_key(str(request.get("public_key")))
            preshared_key = decode_key(str(request.get("preshared_key")))
            lifetime, uses = int(request.get("lifetime", DEFAULT_LIFETIME)), int(request.get("uses", 1))
        except (InvalidKey, TypeError, ValueError, OverflowError) as exc:
            return {"error": f"bad invite request: {exc}"}
        if not 1 <= lifetime <= MAX_LIFETIME or not 1 <= uses <= MAX_USES:
            return {"error": f"an invite lasts 1 to {MAX_LIFETIME} s and has 1 to {MAX_USES} uses"}
        endpoints = self._public_endpoints(request)
        if isinstance(endpoints, str):
            return {"error": endpoints}
        if not is_peer_name(Invite(public_key, preshared_key, name, 0, 0, uses).peer_name(uses - 1)):
            return {"error": f"{name}-{uses} (the name of its last peer) is longer than a name may be"}
        if len(self.invites) >= MAX_OPEN_INVITES:
            return {"error": f"{MAX_OPEN_INVITES} invites are open already; revoke some (tunvpn peers lists them)"}
        if self._name_taken(name) or self._key_taken(public_key):
            return {"error": f"a peer or invite named {name} (or with that key) exists already; choose another --name"}
        wall = int(self.wall_clock())
        invite = self.invites[public_key] = Invite(public_key, preshared_key, name, wall, wall + lifetime, uses)
        self._install_invite(invite)
        self._save_invites()
        self.status_changed()
        log.info("invite %s: created for %d use(s), valid until %s (invite key %s)", name, uses,
                 _utc(invite.expires), short_key(public_key))
        return {"name": self.config.name, "public_key": encode_key(self.device.public_key),
                "invite": _invite_status(invite), "endpoints": endpoints}

    def _public_endpoints(self, request: dict) -> list[str] | str:
        """The request's endpoints (--endpoint), else the config's Endpoint; a str says why neither works."""
        given = request.get("endpoints") or []
        if not isinstance(given, list) or not all(isinstance(e, str) for e in given):
            return "bad request: endpoints is a list of HOST:PORT"
        try:
            endpoints = [public_endpoint(e) for e in given] or list(self.config.interface.public_endpoints)
        except ValueError as exc:
            return f"endpoint {exc}"
        if not endpoints:
            return (f"where do clients reach this server? Give --endpoint HOST:PORT, or set Endpoint in the "
                    f"[Interface] of {self.config.path}")
        if len(endpoints) > MAX_ENDPOINTS:
            return f"an invite carries at most {MAX_ENDPOINTS} endpoints"
        return endpoints

    def _invite_control(self, invite_key: bytes, message, now: float) -> None:
        if isinstance(message, control.EnrollRequest):
            self._enroll(invite_key, message, now)
        elif isinstance(message, control.Goodbye):
            self.device.drop_sessions(invite_key)
        else:
            self.device.count_drop(invite_key, "unexpected_control_message")

    def _enroll(self, invite_key: bytes, request: control.EnrollRequest, now: float) -> None:
        """An invite's holder asks to make its own key a peer: checked, written, then applied."""
        invite = self.invites[invite_key]

        def answer(state: EnrollState, **fields) -> None:
            self.device.send_to_peer(invite_key, [control.encode(control.EnrollAnswer(
                request.request_id, state, **fields))], now)

        if request.public_key in invite.enrolled:  # a repeat: our answer was lost
            answer(EnrollState.ACCEPTED, name=invite.peer_name(invite.enrolled.index(request.public_key)))
            return
        if invite_key in self._enrolling:
            self.device.count_drop(invite_key, "enrollment_in_progress")
            return
        name = invite.peer_name(len(invite.enrolled))
        refusal = ("this invite is used up" if invite.uses_left <= 0 else
                   "this invite has expired" if invite.expires <= self.wall_clock() else
                   "this key is already a peer of the server" if self._key_taken(request.public_key) else
                   f"the name {name} is taken (by a peer added since the invite)"
                   if any(peer.name == name for peer in self.config.peers) else None)
        if refusal is not None:
            self.device.count_drop(invite_key, "enrollment_refused")
            if self.peer_log.allow(invite_key, "enrollment refused", now):
                log.warning("invite %s: enrollment refused: %s", invite.name, refusal)
            answer(EnrollState.REFUSED, reason=refusal)
            return
        wait = self.enroll_limit.take(now)
        if wait:
            self.device.count_drop(invite_key, "enrollment_rate_limited")
            if self.peer_log.allow(invite_key, "enrollment rate limited", now):
                log.warning("invite %s: enrollment rate limited; the next is taken in %.0f s", invite.name, wait)
            answer(EnrollState.RATE_LIMITED, seconds=math.ceil(wait))
            return
        peer = PeerConfig(request.public_key, request.preshared_key, [], None, None, 0, line=2, name=name,
                          source=str(peer_file(self.peers_dir, name)))
        self._enrolling.add(invite_key)
        self._write_peer(peer, f"enrolled with invite {short_key(invite_key)} on {_utc(self.wall_clock())}",
                         lambda error: self._enrolled(invite_key, request, peer, error))

    def _enrolled(self, invite_key: bytes, request: control.EnrollRequest, peer: PeerConfig,
                  error: BaseException | None) -> None:
        now = time.monotonic()
        self._enrolling.discard(invite_key)
        invite = self.invites.get(invite_key)
        if invite is None or error is not None:  # revoked meanwhile, or the disk said no
            if invite is None:
                self.system.submit(f"removing {peer.name}", lambda: remove_peer_file(self.peers_dir, peer.name))
            return
        self._add_peers([peer], now)
        self.invites[invite_key] = invite.spent(peer.public_key, int(self.wall_clock()))
        self._save_invites()
        log.info("invite %s: enrolled peer %s (%s); %d use(s) left", invite.name, peer.name,
                 short_key(peer.public_key), self.invites[invite_key].uses_left)
        self.device.send_to_peer(invite_key, [control.encode(control.EnrollAnswer(
            request.request_id, EnrollState.ACCEPTED, name=peer.name))], now)

    def _write_peer(self, peer: PeerConfig, note: str, done) -> None:
        """Write the peer's file beside the loop; `done(error)` runs on the loop after.  Until then
        its name and key count as taken: a second request for either must not pass the checks."""
        text, directory, name = peer_text(peer, note), self.peers_dir, peer.name
        self._writing[peer.public_key] = name

        def written(_: object, error: BaseException | None) -> None:
            self._writing.pop(peer.public_key, None)
            if isinstance(error, OSError):
                log.error("cannot write %s: %s; peer %s not added", directory / f"{name}.conf",
                          error.strerror or error, name)
            elif error is not None:
                raise error
            done(error)

        if not self.system.submit(f"writing peer {name}", lambda: write_peer_file(directory, name, text), written):
            written(None, OSError("too many disk writes waiting; try again"))

    def _add_peers(self, peers: list[PeerConfig], now: float) -> None:
        """Peers whose files are written: applied now, and journaled for a reload reading meanwhile."""
        self._apply_config(dataclasses.replace(self.config, peers=[*self.config.peers, *peers]), now)
        self._peer_journal += [_PeerChange(peer, added=True, on_disk=True) for peer in peers]
        self.status_changed()

    def reload(self) -> None:
        """A reload reads the peers directory again: changes on disk by now are in what it reads."""
        self._peer_journal = [change for change in self._peer_journal if not change.on_disk]
        super().reload()

    def _replay_peer_changes(self, new: Config) -> Config:
        """The runtime adds and revocations a reload's read may have missed (the read runs beside
        the loop, while a file is written or deleted); the main config still wins every clash."""
        peers = list(new.peers)
        for change in self._peer_journal:
            key = change.peer.public_key
            if any(p.public_key == key and p.source is None for p in peers):
                continue
            peers = [p for p in peers if p.public_key != key] + ([change.peer] if change.added else [])
        self._peer_journal = [change for change in self._peer_journal if not change.on_disk]
        return dataclasses.replace(new, peers=peers)

    def _add_stock_peer(self, request: dict) -> dict:
        """`tunvpn invite --stock`: a peer whose keys the CLI made, with a fixed address from the pool."""
        try:
            name = _checked_name(request.get("name"))
            public_key = decode_key(str(request.get("public_key")))
            preshared_key = decode_key(str(request.get("preshared_key")))
        except (InvalidKey, TypeError, ValueError, OverflowError) as exc:
            return {"error": f"bad request: {exc}"}
        if self._name_taken(name) or self._key_taken(public_key):
            return {"error": f"a peer or invite named {name} (or with that key) exists already; choose another --name"}
        endpoints = self._public_endpoints(request)
        if isinstance(endpoints, str):
            return {"error": endpoints}
        try:
            lease = self._lease(public_key, list(self.pool.subnets))  # held until the peer is applied
        except PoolExhausted as exc:
            return {"error": f"no address to give: {exc}"}
        allowed = [ipaddress.ip_network(address.ip) for address in lease.addresses]
        peer = PeerConfig(public_key, preshared_key, allowed, None, None, 0, line=2, name=name,
                          source=str(peer_file(self.peers_dir, name)))
        self._write_peer(peer, f"a stock WireGuard peer added by tunvpn invite --stock on {_utc(self.wall_clock())}",
                         lambda error: self._stock_peer_written(peer, error))
        interface = self.config.interface
        return {"name": self.config.name, "public_key": encode_key(self.device.public_key),
                "addresses": [str(net) for net in allowed],
                "routes": [str(net) for net in (*self._subnets(), *interface.push_routes)],
                "dns": [str(a) for a in interface.push_dns], "mtu": interface.mtu,
                "keepalive": interface.push_keepalive, "endpoints": endpoints}

    def _stock_peer_written(self, peer: PeerConfig, error: BaseException | None) -> None:
        if error is not None:
            self.pool.release(peer.public_key)
            return
        self._add_peers([peer], time.monotonic())
        log.info("peer %s (%s): added as a stock WireGuard peer with %s; its keys were made on this server",
                 peer.name, short_key(peer.public_key), ", ".join(str(net) for net in peer.allowed_ips))

    def _revoke(self, request: dict) -> dict:
        """`tunvpn revoke`: an invite, or an enrolled peer (its sessions end now)."""
        wanted = str(request.get("peer", ""))
        peer = next((p for p in self.config.peers if wanted in (p.name, encode_key(p.public_key))), None)
        if peer is None:
            for invite in self.invites.values():
                if wanted in (invite.name, encode_key(invite.public_key)):
                    self._drop_invite(invite.public_key, "revoked")
                    return {"revoked": "invite", "name": invite.name}
            return {"error": f"no enrolled peer or invite named {wanted!r} (tunvpn peers lists them)"}
        if peer.source is None:
            return {"error": f"{wanted} is a [Peer] of {self.config.path}: remove it there and reload"}
        self._apply_config(dataclasses.replace(self.config, peers=[p for p in self.config.peers if p is not peer]),
                           time.monotonic())
        change = _PeerChange(peer, added=False)
        self._peer_journal.append(change)
        self.status_changed()
        log.info("peer %s (%s): revoked; its sessions are cut and it cannot connect again", peer.name,
                 short_key(peer.public_key))
        source = Path(peer.source)

        def removed(_: object, error: BaseException | None) -> None:
            change.on_disk = error is None
            if error is not None:
                log.error("cannot remove %s: %s; remove it by hand, or the peer is back after a restart",
                          source, getattr(error, "strerror", None) or error)

        self.system.submit(f"removing {source}", lambda: remove_peer_file(source.parent, source.stem), removed)
        return {"revoked": "peer", "name": peer.name}

    def _list_peers(self) -> dict:
        enrolled = []
        for peer in self.config.peers:
            if peer.source is None:
                continue
            stats = self.device.peer_stats(peer.public_key)
            enrolled.append({"name": peer.name, "public_key": encode_key(peer.public_key),
                             "kind": "stock" if peer.allowed_ips else "tunvpn", "file": peer.source,
                             "addresses": [str(a.ip) for a in self._peer_addresses(peer.public_key, peer.allowed_ips)],
                             "connected": stats.has_session, "latest_handshake": stats.latest_handshake})
        return {"name": self.config.name, "peers_directory": str(self.peers_dir), "enrolled": enrolled,
                "invites": [_invite_status(invite) for invite in self.invites.values()]}

    # --- reload ---------------------------------------------------------------------------------

    def apply_reload(self, new: Config, now: float) -> None:
        added, removed, changed = self._apply_config(self._replay_peer_changes(new), now)
        log.info("reloaded %s: %d peer(s) added, %d removed, %d changed%s", new.path, len(added), len(removed),
                 len(changed), refused_note(self.refused))

    def _apply_config(self, new: Config, now: float) -> tuple[list, list, list]:
        """Apply what changed: the device work is O(added + changed + moved peers)."""
        added, removed, changed = self.diff_peers(new)
        old_push = _push_settings(self.config)
        old_policy_defaults = _policy_defaults(self.config)
        old_leases = self.pool.leases()
        self.config = new
        self._configured = {peer.public_key: peer for peer in new.peers}
        self.pool = self._build_pool(new, old_leases)
        new_leases = self.pool.leases()
        self.device.set_forwarding(bool(new.interface.client_to_client))
        for public_key in removed:
            self.device.remove_peer(public_key)
            self.gate.forget(public_key)
            self.tunvpn_peers.discard(public_key)
            self._last_request.pop(public_key, None)
        # A lease the new pool moved (a changed Pool, a new fixed address) must reach cryptokey
        # routing too, and its client must be told now, or its traffic is dropped until it asks.
        moved = {key for key in self._configured if old_leases.get(key) != new_leases.get(key)}
        touched = moved | {peer.public_key for peer in (*added, *changed)}
        if _policy_defaults(new) != old_policy_defaults:
            touched = set(self._configured)  # every peer without its own limit or rules follows the default
        self._sync_peers([self._configured[key] for key in touched], endpoints=True)
        for public_key in set(self._sync_second_factor()) & self.tunvpn_peers:  # asked for a code, or no longer
            status = self._auth_status(public_key, 0) or [control.encode(control.AuthStatus(
                0, AuthMethod.TOTP, AuthState.NOT_REQUIRED))]
            self.device.send_to_peer(public_key, status, now)
        self.set_routes(self._routed_outside_subnets(new.peers))
        settings_changed = _push_settings(new) != old_push
        for public_key in self.tunvpn_peers if settings_changed else self.tunvpn_peers & touched:
            self.device.send_to_peer(public_key, [self._encoded_answer(public_key, 0)], now)
        return added, removed, changed


def _push_settings(config: Config) -> tuple:
    interface = config.interface
    return (tuple(interface.push_routes), tuple(interface.push_dns), tuple(interface.push_dns_search),
            interface.push_keepalive)


def _lease_of(held: list, families: list[int]) -> Lease:
    """A lease of the first held address of each pool family (a client holds at most one each)."""
    first = {version: next((a for a in held if a.version == version), None) for version in (4, 6)}
    return Lease(first[4] if 4 in families else None, first[6] if 6 in families else None)


def _policy_defaults(config: Config) -> tuple:
    return config.interface.default_rate_limit, tuple(config.interface.default_access)


def _host_network(address) -> IPNetwork:
    """An interface's own address as a /32 or /128, from integers: ip_network() would try IPv4
    first, and an address object is turned into text and parsed again."""
    network = ipaddress.IPv4Network if address.version == 4 else ipaddress.IPv6Network
    return network((int(address.ip), address.max_prefixlen))


def _describe_lease(lease: Lease) -> str:
    return ", ".join(str(a) for a in (lease.ipv4, lease.ipv6) if a is not None)


@dataclasses.dataclass(eq=False)
class _PeerChange:
    """An enrolled peer added or revoked at run time; `on_disk` once its file says so too."""

    peer: PeerConfig
    added: bool
    on_disk: bool = False


def _with_enrolled_peers(config: Config, directory: Path) -> Config:
    enrolled, problems = load_enrolled(directory)
    merged, clashes = with_enrolled(config, enrolled)
    for problem in (*problems, *clashes):
        log.warning("peers directory %s: %s", directory, problem)
    return merged


def _checked_name(value: object) -> str:
    if not is_peer_name(value):
        raise ValueError("a name is 1-64 letters, digits and . _ @ + -, starting with a letter or digit")
    return value


def _invite_status(invite: Invite) -> dict:
    """What `tunvpn show` and `tunvpn peers` say of an invite: never its PSK."""
    return {"name": invite.name, "public_key": encode_key(invite.public_key), "created": invite.created,
            "expires": invite.expires, "uses": invite.uses, "uses_left": invite.uses_left,
            "enrolled": [encode_key(key) for key in invite.enrolled]}


def _utc(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))
