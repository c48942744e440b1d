"""Launched processes watched for sockets that leave the loopback.

Multi-process tests start their processes through ``accelerate launch`` on this machine; everything they send must stay
on 127.0.0.1. The watch samples the connected sockets of the launcher and all its children every 0.1 s while they run.
"""

import subprocess
import tempfile
import time
from pathlib import Path

import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def remote_addresses(procs) -> set[tuple[str, str, int]]:
    """``(kind, address, port)`` of every connected TCP and UDP socket of the launchers and their processes, now."""
    found = set()
    for proc in procs:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            for kind in ("tcp", "udp"):
                try:
                    found |= {(kind, c.raddr.ip, c.raddr.port) for c in member.net_connections(kind) if c.raddr}
                except psutil.NoSuchProcess:
                    pass
    return found


def nameservers() -> set[str]:
    path = Path("/etc/resolv.conf")
    lines = path.read_text().splitlines() if path.exists() else []
    return {line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1}


def beyond_loopback(seen: set[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    """What reached another address than the loopback. torch's rendezvous store looks up the host name of each peer
    (``getnameinfo``) to format its log lines; where the resolver does not answer ``::ffff:127.0.0.1`` from
    /etc/hosts, that is one UDP query to the system's nameserver, port 53, carrying no data of the run. Those are
    the only sockets allowed off the loopback; every TCP connection must stay on it."""
    dns = nameservers()
    return {c for c in seen if c[1] not in LOOPBACK and not (c[0] == "udp" and c[1] in dns and c[2] == 53)}


def kill(procs) -> None:
    """SIGKILL the launchers and every process they started (torch's agent starts each worker in its own session)."""
    family = []
    for proc in procs:
        try:
            family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        proc.wait()


def run_on_loopback(cmd: list[str], *, env: dict, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that also fails when any process it started opened
    a socket beyond the loopback."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        seen, end = set(), time.monotonic() + timeout
        while proc.poll() is None:
            seen |= remote_addresses([proc])
            if time.monotonic() > end:
                kill([proc])
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    assert not beyond_loopback(seen), f"sockets beyond the loopback: {sorted(beyond_loopback(seen))}"
    return done
