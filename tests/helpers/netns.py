"""Two or three hosts on one machine: Linux network namespaces joined by a virtual link.

Each host is a network namespace with its own address on 10.77.0.0/24, `lo` up, an `eth0` whose peer sits in
a bridge namespace of its own (so no address is visible outside the namespaces), its own host name (a UTS
namespace per process) and an /etc/hosts naming every host (/etc/netns/<ns>/hosts, which `ip netns exec`
mounts), so a hostfile can name the hosts. Optional `private` folders give every host its own disk at the same
path (a bind mount in a mount namespace per process), like local NVMe on a cluster.

    with Hosts(2, tmp_path) as hosts:
        a, b = hosts
        b.popen(["python", "-m", "http.server", "8000"])
        assert a.run(["curl", f"http://{b.name}:8000/"]).returncode == 0
        hosts.link_down(b)      # the cable is pulled: packets to and from b are dropped
        hosts.kill(b)           # every process started in b (services too, unless keep_services)

Names carry this process's pid, so parallel xdist workers and a killed run's leftovers never collide;
`Hosts` removes the leftovers of dead pids when it starts. Needs root and `ip` (iproute2); `unavailable()`
says why not, for a skip.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "rlhfh"  # namespace names: rlhfh<pid>n<i> (hosts), rlhfh<pid>br (the bridge)
SUBNET = "10.77.0"
NETNS_ETC = Path("/etc/netns")
_NAME = re.compile(rf"^{PREFIX}(\d+)(n\d+|br)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a sentence for pytest.skip), or None when they can."""
    if shutil.which("ip") is None:
        return "the multihost tier needs `ip` (iproute2), which is not installed"
    if shutil.which("unshare") is None:
        return "the multihost tier needs `unshare` (util-linux), which is not installed"
    if os.geteuid() != 0:
        return "the multihost tier makes network namespaces, which needs root (this user is not)"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"this machine does not allow network namespaces: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _kill_all(ns: str, keep: set[int] = frozenset()) -> None:
    """SIGKILL every process in namespace `ns` except `keep`, and wait (briefly) until they are gone."""
    for _ in range(50):
        pids = [p for p in _netns_pids(ns) if p not in keep]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _delete(ns: str) -> None:
    _kill_all(ns)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Delete the namespaces (and their /etc/netns files) left by test sessions whose process is gone."""
    stale = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete(name)
            stale.append(name)
    return stale


class Host:
    """One host: a network namespace, its address and name, and the processes started in it."""

    def __init__(self, index: int, ns: str, private: dict[Path, Path]):
        self.index = index
        self.ns = ns
        self.name = f"node{index}"
        self.addr = f"{SUBNET}.{index + 1}"
        self.private = private  # path every process sees -> this host's own folder mounted there
        self.procs: list[subprocess.Popen] = []
        self.services: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.addr}, ns={self.ns})"

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` wrapped to run in this host: its network namespace, its host name, its private folders."""
        setup = [f"echo {self.name} > /proc/sys/kernel/hostname"]
        setup += [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}" for dst, src in
                  self.private.items()]
        script = " && ".join(setup) + ' && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *[str(a) for a in argv]]

    def popen(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
              service: bool = False, **kwargs) -> subprocess.Popen:
        """Start `argv` in this host (Popen's keyword arguments pass through). `service`: a daemon such as sshd,
        which `Hosts.kill(host, keep_services=True)` leaves running."""
        proc = subprocess.Popen(self.argv(argv), env=env, cwd=cwd, **kwargs)
        (self.services if service else self.procs).append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` in this host to the end; captures text output unless told otherwise."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(argv), env=env, cwd=cwd, timeout=timeout, **kwargs)


class Hosts:
    """`n` hosts on one virtual switch; a context manager that always tears everything down.

    `private`: paths (folders) that each host sees as its own disk; host i's folder is `tmp/node<i>/<k>`, where
    `k` is the path's position in `private`. `tmp` is required with `private`."""

    def __init__(self, n: int = 2, tmp: Path | None = None, private: list[Path] = ()):
        if not 1 <= n <= 250:
            raise ValueError(f"Hosts: n={n}, expected 1..250")
        if private and tmp is None:
            raise ValueError("Hosts: `private` folders need `tmp` to hold each host's copy")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}br"
        self.hosts: list[Host] = []
        self.ssh_env: dict[str, str] | None = None  # set by start_sshd
        for i in range(n):
            own = {}
            for k, path in enumerate(private):
                own[Path(path)] = Path(tmp) / f"node{i}" / str(k)
            self.hosts.append(Host(i, f"{self.tag}n{i}", own))

    def __enter__(self) -> Hosts:
        clean_stale()
        for ns in [self.bridge_ns] + [h.ns for h in self.hosts]:
            _delete(ns)  # this pid's own leftovers (a fixture re-made in one session)
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def _make(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            _ip("link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", self.port(h),
                "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", self.port(h), "master", "br0", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            (NETNS_ETC / h.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / h.ns / "hosts").write_text(hosts_file)
            for src in h.private.values():
                src.mkdir(parents=True, exist_ok=True)
            for dst in h.private:
                dst.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def port(host: Host) -> str:
        """The name of `host`'s switch port (its link's far end, in the bridge namespace)."""
        return f"p{host.index}"

    def link_down(self, host: Host) -> None:
        """Pull `host`'s cable: its switch port goes down, so packets to and from it are dropped (no error
        reaches the sockets; TCP retransmits until its own timeouts)."""
        _ip("-n", self.bridge_ns, "link", "set", self.port(host), "down")

    def link_up(self, host: Host) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self.port(host), "up")

    def kill(self, host: Host, keep_services: bool = False) -> None:
        """SIGKILL every process started in `host` (all processes in its namespace), services too unless
        `keep_services`."""
        # A kept service keeps only its own process: an sshd's sessions (and what they launched) die.
        keep = {p.pid for p in host.services} if keep_services else set()
        _kill_all(host.ns, keep)
        for proc in host.procs + ([] if keep_services else host.services):
            _reap(proc)

    def tx_bytes(self, host: Host) -> int:
        """Bytes `host` has sent over its link (its eth0's counter)."""
        return int(self._stat(host, "tx_bytes"))

    def rx_bytes(self, host: Host) -> int:
        return int(self._stat(host, "rx_bytes"))

    @staticmethod
    def _stat(host: Host, name: str) -> str:
        # /sys inside `ip netns exec` shows the namespace's own interfaces.
        out = subprocess.run(["ip", "netns", "exec", host.ns, "cat", f"/sys/class/net/eth0/statistics/{name}"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def start_sshd(self, folder: Path) -> dict[str, str]:
        """An sshd in every host (a service) that takes a throwaway key made in `folder`; returns the environment
        additions under which `ssh <host name>` (and pdsh, and DeepSpeed's runner) reach any host as root without
        a prompt: PATH first names an `ssh` that uses `folder`'s own config. ~/.ssh is never read or written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("client_key", "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
        (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
        (folder / "sshd_config").write_text(
            f"HostKey {folder / 'host_key'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\nStrictModes no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nPidFile none\n"
            "LogLevel ERROR\n")
        (folder / "ssh_config").write_text(
            f"Host *\n  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 10\n")
        bin_dir = folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {folder / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        for h in self.hosts:
            h.popen([sshd, "-D", "-e", "-f", str(folder / "sshd_config")], service=True)
        env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        for h in self.hosts:
            self._wait_for_ssh(h, env)
        self.ssh_env = env
        return env

    def _wait_for_ssh(self, target: Host, env: dict[str, str], wait_s: float = 20) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            probe = self.hosts[0].run(["ssh", target.name, "hostname"], env=dict(os.environ, **env), timeout=30)
            if probe.returncode == 0 and probe.stdout.strip() == target.name:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {target} did not answer: {probe.stderr.strip()}")
            time.sleep(0.2)

    def close(self) -> None:
        for h in self.hosts:
            _delete(h.ns)
            for proc in h.procs + h.services:
                _reap(proc)
        _delete(self.bridge_ns)


def _reap(proc: subprocess.Popen) -> None:
    """Collect a process already killed (its wrapper `ip netns exec` may sit outside the namespace)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
