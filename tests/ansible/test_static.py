"""The role and playbook pass Ansible's own checks, and the Vagrantfile feeds the role what it reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLE = REPO_ROOT / "ansible/roles/tunvpn"
ANSIBLE_BIN = Path(sys.executable).parent
GROUPS = {"tunvpn_servers", "tunvpn_clients"}


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": f"{ANSIBLE_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"),
                   "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"), **env}
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


def role_variables() -> set[str]:
    return set(yaml.safe_load((ROLE / "defaults/main.yml").read_text()))


def test_ansible_lint_production_profile_is_clean(tmp_path):
    result = run([str(ANSIBLE_BIN / "ansible-lint"), "--offline", "--profile", "production", "site.yml", "ansible/"],
                 XDG_CACHE_HOME=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_playbook_syntax_check_with_the_example_inventory():
    result = run([str(ANSIBLE_BIN / "ansible-playbook"), "--syntax-check", "-i",
                  "ansible/inventory/example/hosts.ini", "site.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_role_variable_is_prefixed_and_documented():
    readme = (ROLE / "README.md").read_text()
    for name in role_variables():
        assert name.startswith("tunvpn_"), name
        assert f"`{name}`" in readme, f"{name} is not in the role's README"


def test_vagrantfile_validates_and_passes_what_the_role_expects(tmp_path):
    result = run(["vagrant", "validate", "--ignore-provider"], TUNVPN_VAGRANT_DUMP="1",
                 VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_HOME=str(tmp_path / "home"))
    assert result.returncode == 0 and "validated successfully" in result.stdout, result.stdout + result.stderr
    passed = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert set(passed["groups"]) == GROUPS and len(passed["groups"]["tunvpn_servers"]) == 1
    machines = set(passed["machines"])
    grouped = {host for hosts in passed["groups"].values() for host in hosts}
    assert grouped <= machines and machines - grouped == {"lanhost"}
    known = role_variables()
    for host, variables in passed["host_vars"].items():
        assert host in grouped, host
        assert set(variables) <= known, set(variables) - known
    extra = {name for name in passed["extra_vars"] if name != "ansible_python_interpreter"}
    assert extra <= known, extra - known
    assert passed["extra_vars"]["ansible_python_interpreter"] == "/usr/bin/python3"
