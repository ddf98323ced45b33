"""Multi-node set-ups checked before the rendezvous (engine/runtime/network.py): the master address, gloo's
interface, the hostfile. The same checks across real hosts: tests/multihost/test_bad_setups.py."""
from __future__ import annotations

import re
import socket

import psutil
import pytest

import e2e_rlhf as e2e
from engine.errors import UserError
from engine.runtime import network

REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture
def unknown_host(monkeypatch):
    """Names ending in .unknown do not resolve (no DNS query: a resolver may take seconds to say so)."""
    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".unknown"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return REAL_GETADDRINFO(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _outside_address() -> tuple[str, str] | None:
    """(interface, IPv4 address) of one of this machine's non-loopback interfaces, if it has one."""
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return name, a.address
    return None


def test_a_master_address_that_does_not_resolve_is_named(unknown_host):
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "node7.unknown", "MASTER_PORT": "29500"}
    message = r"MASTER_ADDR 'node7.unknown' .*--master_addr\) does not resolve on host .*/etc/hosts"
    with pytest.raises(UserError, match=message):
        network.check_master(env)


def test_one_machine_and_world_of_one_are_left_alone(unknown_host):
    network.check_master({"WORLD_SIZE": "1", "MASTER_ADDR": "node7.unknown"})
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    network.check_master(env)
    assert "GLOO_SOCKET_IFNAME" not in env


def test_no_route_to_the_master_is_refused(monkeypatch):
    def connect(self, address):
        raise OSError(network.errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(UserError, match=r"MASTER_ADDR 10.99.0.1 \(10.99.0.1\) cannot be reached from host .*"
                                        r"Network is unreachable"):
        network.check_master({"WORLD_SIZE": "2", "MASTER_ADDR": "10.99.0.1", "MASTER_PORT": "29500"})


@pytest.mark.parametrize("loopback_name", [True, False])
def test_gloo_leaves_loopback_for_the_interface_to_the_master(monkeypatch, loopback_name):
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    monkeypatch.setattr(network, "hostname_is_loopback", lambda: loopback_name)
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": outside[1], "MASTER_PORT": "29500"}
    network.check_master(env)
    assert env.get("GLOO_SOCKET_IFNAME") == (outside[0] if loopback_name else None)
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": outside[1], "GLOO_SOCKET_IFNAME": "mine"}
    network.check_master(env)
    assert env["GLOO_SOCKET_IFNAME"] == "mine"  # the user's choice stands


@pytest.mark.parametrize("text,message", [
    ("localhost slots=2\nnode7.unknown slots=2\n", "line 2 names host 'node7.unknown', which does not resolve"),
    ("localhost slots=2\nlocalhost 2\n", "line 2 ('localhost 2') is not '<host> slots=<ranks>'"),
    ("# only a comment\n\n", "names no node"),
])
def test_bad_hostfiles_are_refused_naming_the_line(tmp_path, unknown_host, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        network.read_hostfile(hostfile)


def test_a_good_hostfile_reads_with_comments(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the nodes\nlocalhost slots=8  # first\n127.0.0.1 slots=4\n")
    assert network.read_hostfile(hostfile) == [("localhost", 8), ("127.0.0.1", 4)]


def test_e2e_multi_node_checks_the_hostfile_before_anything_runs(tmp_path, monkeypatch, unknown_host):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1.unknown slots=8\n")
    monkeypatch.setenv("HOSTFILE", str(hostfile))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="line 1 names host 'worker-1.unknown'"):
        e2e.main(["--actor-model", "66b", "--deployment-type", "multi_node", "--output_dir", str(out)])
    assert not out.exists()
    monkeypatch.setenv("HOSTFILE", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="hostfile .*missing not found"):
        e2e.main(["--actor-model", "66b", "--deployment-type", "multi_node", "--output_dir", str(out)])


def test_world_size_check_only_across_machines_and_not_under_torchrun(monkeypatch):
    def no_store(*args, **kwargs):
        raise AssertionError("no store expected")

    monkeypatch.setattr(network.torch.distributed, "TCPStore", no_store)
    base = {"RANK": "1", "WORLD_SIZE": "3", "MASTER_PORT": "29500"}
    network.check_world_size(base | {"MASTER_ADDR": "127.0.0.1"})  # one machine
    network.check_world_size(base | {"MASTER_ADDR": "10.99.0.1", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    network.check_world_size({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "10.99.0.1", "MASTER_PORT": "29500"})
