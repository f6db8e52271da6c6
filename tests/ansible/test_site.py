"""site.yml deploys the .deb onto real systemd hosts: converge, idempotence, verify, destroy.

Topology (trixie systemd-nspawn hosts from tests/systemdhosts.py):
    client1, client2 --- switch (192.0.2.0/24, the controller runs here) --- server --- lanhost
                                                                             (198.51.100.0/24)
The LAN host has no route to the tunnel subnet, so its replies reach the clients only because
the role masquerades the tunnel out of the server's LAN interface.

Molecule is not used: its delegated driver runs create and destroy as separate playbook
processes, so the hosts would have to outlive the process that made them, which is exactly
what the host tool forbids (it removes every container, mount and namespace when its test
process ends, even when it is killed).  The steps are molecule's, run from pytest with
ansible-playbook: converge, idempotence (a second run changes nothing), verify, destroy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from netlab import transfer, wait_until
from systemdhosts import SystemdHost, SystemdLab

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_BIN = Path(sys.executable).parent  # the test venv has ansible-core
PLAYBOOK_TIMEOUT = 600.0
SERVER_LAN = "198.51.100.1"
LAN_HOST = "198.51.100.2"
SERVER_TUNNEL = "203.0.113.1"
MB = 1024 * 1024
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


@dataclass
class Site:
    lab: SystemdLab
    hosts: dict[str, SystemdHost]
    lan_interface: str
    workdir: Path
    deb: Path

    def inventory(self, clients: tuple[str, ...] = ("client1", "client2"), **group_vars: object) -> Path:
        """An inventory like the shipped example, for these hosts; returns its path."""
        lines = ["[tunvpn_servers]", f"server ansible_host={self.hosts['server'].address}", "",
                 "[tunvpn_clients]"]
        lines += [f"{name} ansible_host={self.hosts[name].address}" for name in clients]
        lines += ["", "[all:vars]", "ansible_user=root", "ansible_python_interpreter=/usr/bin/python3",
                  f"ansible_ssh_private_key_file={self.workdir / 'id_ed25519'}",
                  "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'"]
        variables = {
            "tunvpn_package_source": "file",
            "tunvpn_deb_file": str(self.deb),
            "tunvpn_addresses": [f"{SERVER_TUNNEL}/24", "2001:db8:100::1/64"],
            "tunvpn_push_routes": ["198.51.100.0/24"],
            "tunvpn_nat_interface": self.lan_interface,
            **group_vars,
        }
        directory = self.workdir / "inventory"
        (directory / "group_vars").mkdir(parents=True, exist_ok=True)
        (directory / "group_vars" / "all.json").write_text(json.dumps(variables))
        path = directory / "hosts.ini"
        path.write_text("\n".join(lines) + "\n")
        return path

    def playbook(self, inventory: Path, *extra: str) -> dict[str, tuple[int, int]]:
        """ansible-playbook site.yml from the switch namespace; {host: (changed, failed)} from the recap."""
        env = {"PATH": f"{ANSIBLE_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.workdir),
               "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(self.workdir / "tmp")}
        command = ["env", "-i", *(f"{k}={v}" for k, v in env.items()),
                   str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(inventory), str(REPO_ROOT / "site.yml"), *extra]
        result = self.lab.switch.run(command, timeout=PLAYBOOK_TIMEOUT, check=False)
        log = self.workdir / f"playbook-{time.monotonic_ns()}.log"
        log.write_text(result.stdout + result.stderr)
        recap = {host: (int(changed), int(unreachable) + int(failed))
                 for host, _, changed, unreachable, failed in RECAP.findall(result.stdout)}
        assert result.returncode == 0 and recap, f"site.yml failed ({log}):\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
        return recap

    def show(self, name: str) -> dict:
        return json.loads(self.hosts[name].run(["tunvpn", "show", "office", "--json"]).stdout)

    def tunnel_address(self, name: str) -> str:
        def pushed() -> str | None:
            status = self.show(name)
            return next((a.split("/")[0] for a in status["addresses"] if "." in a), None)
        return wait_until(pushed, 30, interval=0.5, what=f"a pool address on {name}")

    def can_ping(self, name: str, address: str, attempts: int = 1) -> bool:
        return self.hosts[name].run(["ping", "-c", str(attempts), "-W", "2", address], check=False,
                                    timeout=10 + 2 * attempts).returncode == 0


def authorize_controller(lab: SystemdLab, workdir: Path) -> dict[str, SystemdHost]:
    """An SSH key for the controller, authorized on every host of `lab`."""
    (workdir / "tmp").mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "id_ed25519")], check=True)
    public_key = (workdir / "id_ed25519.pub").read_text()
    for host in lab.hosts.values():
        host.put_file("/root/.ssh/authorized_keys", public_key, mode=0o600)
    return dict(lab.hosts)


@pytest.fixture(scope="module")
def site(deb: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("ansible")
    with SystemdLab("trixie") as lab:
        lab.add_hosts(["server", "lanhost", "client1", "client2"])
        server_lan, _ = lab.netlab.link(lab.hosts["server"].namespace, lab.hosts["lanhost"].namespace,
                                        [f"{SERVER_LAN}/24"], [f"{LAN_HOST}/24"])
        yield Site(lab, authorize_controller(lab, workdir), server_lan, workdir, deb)


def test_converge_connects_every_client(site: Site):
    recap = site.playbook(site.inventory())
    assert set(recap) == {"server", "client1", "client2"} and all(failed == 0 for _, failed in recap.values())
    addresses = {name: site.tunnel_address(name) for name in ("client1", "client2")}
    assert len(set(addresses.values())) == 2
    for name in addresses:
        assert wait_until(lambda: site.can_ping(name, SERVER_TUNNEL), 20, interval=0.5, what=f"{name} -> server")
    server = site.hosts["server"]
    assert server.run(["systemctl", "is-active", "tunvpn-server@office"]).stdout.strip() == "active"
    key = server.run(["stat", "-c", "%U:%G %a", "/etc/tunvpn/office.key"]).stdout.strip()
    assert key == "root:tunvpn 640"
    assert server.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_a_second_run_changes_nothing(site: Site):
    recap = site.playbook(site.inventory())
    assert {host: changed for host, (changed, _) in recap.items()} == {"server": 0, "client1": 0, "client2": 0}


def test_private_keys_never_leave_their_host(site: Site):
    """No private key in the controller's output, facts or files: only public keys travel."""
    secrets = {name: host.run(["cat", "/etc/tunvpn/office.key"]).stdout.strip() for name, host in site.hosts.items()
               if name != "lanhost"}
    controller_text = "\n".join(p.read_text(errors="replace") for p in site.workdir.rglob("*") if p.is_file()
                                and p.stat().st_size < 10 * MB)
    for name, secret in secrets.items():
        assert len(secret) == 44 and secret not in controller_text, f"{name}'s private key reached the controller"


def test_clients_reach_the_lan_through_nat(site: Site):
    for name in ("client1", "client2"):
        assert wait_until(lambda: site.can_ping(name, LAN_HOST), 20, interval=0.5, what=f"{name} -> LAN host")
        result = transfer(site.hosts[name].namespace, site.hosts["lanhost"].namespace, LAN_HOST, 5 * MB, timeout=60)
        assert result.sent_sha256 == result.received_sha256
        assert result.source == SERVER_LAN, "the LAN host must see the server's LAN address (masquerade)"
    assert site.hosts["lanhost"].run(["ip", "route", "get", SERVER_TUNNEL], check=False).returncode != 0


def test_client_to_client_follows_the_variable_by_reload(site: Site):
    other = site.tunnel_address("client2")
    assert not site.can_ping("client1", other, attempts=2)
    server = site.hosts["server"]
    started = server.run(["systemctl", "show", "-P", "ExecMainStartTimestampMonotonic", "tunvpn-server@office"]).stdout
    site.playbook(site.inventory(tunvpn_client_to_client=True))
    assert wait_until(lambda: site.can_ping("client1", other), 20, interval=0.5, what="client1 -> client2")
    after = server.run(["systemctl", "show", "-P", "ExecMainStartTimestampMonotonic", "tunvpn-server@office"]).stdout
    assert after == started, "a change of ClientToClient must reload the server, not restart it"
    site.playbook(site.inventory())
    assert wait_until(lambda: not site.can_ping("client1", other), 20, interval=0.5, what="client1 cut from client2")


def test_the_tunnel_comes_back_after_the_server_reboots(site: Site):
    site.hosts["server"].reboot()
    for name in ("client1", "client2"):
        assert wait_until(lambda: site.can_ping(name, LAN_HOST), 60, interval=1.0, what=f"{name} -> LAN after reboot")
    rules = site.hosts["server"].run(["nft", "list", "table", "inet", "tunvpn"]).stdout
    assert "masquerade" in rules


def test_a_client_removed_from_the_inventory_is_cut_off(site: Site):
    address = site.tunnel_address("client2")
    recap = site.playbook(site.inventory(clients=("client1",)))
    assert recap["server"][0] > 0
    assert wait_until(lambda: not site.can_ping("client2", SERVER_TUNNEL), 20, interval=0.5,
                      what="client2 cut off")
    assert site.can_ping("client1", SERVER_TUNNEL, attempts=2)
    peers = [peer["public_key"] for peer in site.show("server")["peers"]]
    assert len(peers) == 1 and address not in json.dumps(site.show("server")["peers"])


def test_state_absent_uninstalls_cleanly(site: Site):
    site.playbook(site.inventory(clients=("client1",)), "-e", "tunvpn_state=absent")
    for name in ("server", "client1"):
        host = site.hosts[name]
        assert host.run(["dpkg-query", "-W", "tunvpn"], check=False).returncode != 0
        assert host.run(["test", "-e", "/etc/tunvpn/office.key"], check=False).returncode == 0  # kept: not asked
        assert host.run(["test", "-e", "/etc/sysctl.d/60-tunvpn.conf"], check=False).returncode != 0
        assert host.run(["pgrep", "-f", "tunvpn"], check=False).returncode != 0
    assert site.hosts["server"].run(["nft", "list", "table", "inet", "tunvpn"], check=False).returncode != 0


def test_site_on_bookworm_hosts(deb: Path, tmp_path: Path):
    """Bookworm is still supported: the same playbook converges there, idempotently."""
    with SystemdLab("bookworm") as lab:
        lab.add_hosts(["server", "client1"])
        site = Site(lab, authorize_controller(lab, tmp_path), "", tmp_path, deb)
        site.playbook(site.inventory(clients=("client1",), tunvpn_push_routes=[]))
        site.tunnel_address("client1")
        assert wait_until(lambda: site.can_ping("client1", SERVER_TUNNEL), 20, interval=0.5, what="client1 -> server")
        recap = site.playbook(site.inventory(clients=("client1",), tunvpn_push_routes=[]))
        assert {host: changed for host, (changed, _) in recap.items()} == {"server": 0, "client1": 0}
