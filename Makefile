# tunvpn: `sudo make test` sets up everything the tests need, then runs the suite
# under a venv (current PyPI releases) and under Debian's python3 (what the .deb runs on).

SHELL := /bin/bash
PYTHON ?= python3
DEBIAN_PYTHON := /usr/bin/python3
VENV := .venv
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)
export PYTHONDONTWRITEBYTECODE := 1

APT_PACKAGES := python3 python3-venv python3-pip python3-cryptography python3-pyroute2 python3-pytest \
	wireguard-go wireguard-tools iproute2 iputils-ping nftables procps python3-prometheus-client iperf3
# The .deb's build and lint, and the systemd-nspawn hosts its tests install it on.
PACKAGE_APT_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian \
	systemd-container debootstrap
# The Ansible role's tests: SSH into those hosts, and `vagrant validate` of the Vagrantfile.
ANSIBLE_APT_PACKAGES := openssh-client vagrant

.PHONY: test unit fuzz demo bench deps package-deps deb package-test venv check-root clean

# tests/package and tests/ansible test the .deb on systemd hosts, not an interpreter: one run suffices.
test: check-root deps venv deb
	tools/run-pytest $(VENV)/bin/python --ignore=tests/package --ignore=tests/ansible $(PYTEST_ARGS)
	TUNVPN_EXPECT_DEBIAN_LIBS=1 tools/run-pytest $(DEBIAN_PYTHON) -p no:cacheprovider --ignore=tests/package --ignore=tests/ansible \
		--ignore=tests/fuzz/test_campaign.py $(PYTEST_ARGS)
	tools/run-pytest $(VENV)/bin/python tests/package tests/ansible $(PYTEST_ARGS)

# build/tunvpn_VERSION_all.deb, built from a clean copy of the tree and checked by lintian --pedantic.
deb: package-deps
	tools/build-deb

# The .deb on trixie and bookworm systemd-nspawn hosts (root; builds the cached rootfs once).
package-test: check-root deps package-deps venv
	tools/run-pytest $(VENV)/bin/python tests/package $(PYTEST_ARGS)

# An office VPN in network namespaces: server, LAN host, two clients; cleaned up at the end.
demo: check-root deps
	$(DEBIAN_PYTHON) tools/demo

# tunvpn (venv, bookworm's and trixie's python3) next to raw veth, wireguard-go (bookworm's and
# trixie's), OpenVPN and fastd: build/bench/results.md, results.json, throughput.png.
# The script installs what it lacks (BENCH_ARGS e.g. --rounds 1 --seconds 2 --systems veth fastd).
BENCH_ARGS ?=
bench: check-root deps venv
	$(DEBIAN_PYTHON) benchmarks/throughput.py --out build/bench $(BENCH_ARGS)
	$(DEBIAN_PYTHON) benchmarks/scale.py --out build/bench

# Every fuzz target under atheris for FUZZ_SECONDS each (make test runs 80000 inputs each); crashes fail it.
fuzz: venv
	FUZZ_SECONDS=$${FUZZ_SECONDS:-300} FUZZ_RUNS=$${FUZZ_RUNS:-100000000} \
		tools/run-pytest $(VENV)/bin/python -s tests/fuzz/test_campaign.py $(PYTEST_ARGS)

# The tests that need no root, under the venv only: the quick loop while coding.
unit: venv
	tools/run-pytest $(VENV)/bin/python tests/unit $(PYTEST_ARGS)

check-root:
	@if [ "$$(id -u)" != 0 ]; then echo "this needs root (tun devices, network namespaces): sudo make $(MAKECMDGOALS)" >&2; exit 1; fi

deps:
	tools/ensure-deps $(APT_PACKAGES)

package-deps:
	tools/ensure-deps $(PACKAGE_APT_PACKAGES) $(ANSIBLE_APT_PACKAGES)

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml tools/test-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r tools/test-requirements.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
