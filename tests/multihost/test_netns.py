"""The two-host fixture itself: separate stacks joined by one link, names, private disks, faults, teardown."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import netns

pytestmark = pytest.mark.multihost

# A tiny TCP echo: serve prints the port it is ready on; connect prints what came back or the error's name.
SERVE = ("import socket; s = socket.create_server(('0.0.0.0', 7777)); print('ready', flush=True); "
         "c, _ = s.accept(); c.sendall(c.recv(64))")
CONNECT = ("import socket, sys; s = socket.socket(); s.settimeout(float(sys.argv[2]));\n"
           "try:\n s.connect((sys.argv[1], 7777)); s.sendall(b'hi'); print(s.recv(64).decode())\n"
           "except OSError as e:\n print(type(e).__name__)")


def _serve(host) -> subprocess.Popen:
    proc = host.popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _connect(host, target: str, timeout: float = 5) -> str:
    return host.run([sys.executable, "-c", CONNECT, target, str(timeout)], timeout=30).stdout.strip()


def test_two_hosts_talk_by_name_over_their_link(hosts):
    a, b = hosts
    assert (a.addr, b.addr) != (None, None) and a.addr != b.addr
    assert a.run(["hostname"]).stdout.strip() == a.name
    assert b.run(["hostname"]).stdout.strip() == b.name
    # each sees only its own address (and lo), and the root namespace has neither
    assert f"{a.addr}/24" in a.run(["ip", "-4", "addr"]).stdout and b.addr not in a.run(["ip", "-4", "addr"]).stdout
    assert a.addr not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    _serve(b)
    sent = hosts.tx_bytes(a)
    assert _connect(a, b.name) == "hi"
    assert hosts.tx_bytes(a) > sent  # the bytes went over a's link, not a loopback


def test_link_down_drops_packets_and_link_up_restores(hosts):
    a, b = hosts
    _serve(b)
    hosts.link_down(b)
    assert _connect(a, b.addr, timeout=2) in ("TimeoutError", "timeout")
    hosts.link_up(b)
    # The failed ARP lookup while the link was down is remembered for a few seconds (EHOSTUNREACH: "OSError").
    deadline = time.monotonic() + 15
    while (answer := _connect(a, b.addr)) == "OSError" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answer == "hi"


def test_kill_stops_every_process_of_one_host(hosts):
    a, b = hosts
    sleeper_a = a.popen(["sleep", "60"])
    service_b = b.popen(["sleep", "60"], service=True)
    sleeper_b = b.popen(["sh", "-c", "sleep 60 & sleep 60"])
    hosts.kill(b, keep_services=True)
    assert sleeper_b.poll() is not None and service_b.poll() is None and sleeper_a.poll() is None
    assert netns._netns_pids(b.ns) == [service_b.pid]
    hosts.kill(b)
    assert service_b.poll() is not None and netns._netns_pids(b.ns) == []


def test_private_folders_three_hosts_and_teardown(make_hosts, tmp_path):
    shared = tmp_path / "local_disk"
    hosts = make_hosts(3, private=[shared])
    for h in hosts:
        h.run(["sh", "-c", f"echo {h.name} > {shared}/who"], check=True)
    assert [h.run(["cat", f"{shared}/who"]).stdout.strip() for h in hosts] == ["node0", "node1", "node2"]
    assert not (shared / "who").exists()  # the machine's own view of that path is untouched
    _serve(hosts[2])
    assert _connect(hosts[0], "node2") == "hi"
    names = [h.ns for h in hosts] + [hosts.bridge_ns]
    hosts.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names) and not any((netns.NETNS_ETC / n).exists() for n in names)


def test_leftovers_of_a_dead_session_are_cleaned(netns_ok):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    name = f"{netns.PREFIX}{dead}n0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    (netns.NETNS_ETC / name).mkdir(parents=True, exist_ok=True)
    try:
        assert name in netns.clean_stale()
        assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not (netns.NETNS_ETC / name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
