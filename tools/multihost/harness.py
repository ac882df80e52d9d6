#!/usr/bin/env python3
"""Build (and take away) the multi-host site: separate hosts on this one machine.

Every host of ``inventories/multihost`` is a set of namespaces kept alive by a small holder process:

- its own network namespace, reached by a veth pair on a switch (a bridge in a namespace of its
  own), with a loopback-range address (127.0.50.N/24) on ``eth0``. Inside, the local route of
  127.0.0.0/8 is removed (127.0.0.1 stays on ``lo``) and ``route_localnet`` is on, so that the
  kernel routes 127.0.50.0/24 out of ``eth0`` instead of delivering it to ``lo``;
- its own mount namespace, in which the per-host paths (:data:`PRIVATE_PATHS`) are bind mounts of
  per-host directories: a file a host needs must really be delivered to it. What a cluster shares
  (``/usr``, ``/opt``, ``/home``, ``/tmp``, the tiers under ``/srv``) stays shared;
  ``/etc/hosts`` is one file for the whole cluster (its "DNS");
- its own UTS namespace, whose host name is the inventory name (slurmctld checks its own name).

Each host runs its own ``sshd`` (its own host key, listening on its own address only; ``root``
logs in with the key this harness makes). ``known_hosts`` lists every host key: Ansible checks
them. The machine's own (root) namespace is the sysadmin's workstation: one veth of its own
(127.0.50.254) on the switch and one policy-routing rule that sends 127.0.50.0/24, and only what
this namespace itself sends there, out of that veth; nothing else of the root namespace changes,
so the local site on 127.0.0.1 is untouched.

Commands (every one idempotent, every wait bounded)::

    harness.py up                       build what is missing, start what is not running
    harness.py down                     stop every process of the hosts, remove everything
    harness.py status [--json]          what runs
    harness.py exec HOST -- CMD ...     run CMD on HOST (nsenter into its namespaces)
    harness.py link HOST up|down        plug or cut HOST's network link
    harness.py pid HOST                 the holder's pid (nsenter -t PID --net --mount --uts)

State lives under ``$IOSEA_MH_DIR`` (default /var/lib/iosea-multihost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("IOSEA_MH_DIR", "/var/lib/iosea-multihost"))
SUBNET = "127.0.50"
PREFIX = 24
# Host name -> last byte of its address. Matches inventories/multihost/hosts.yml.
HOSTS = {
    "login": 1,
    "wm": 2,
    "controller": 3,
    "datanode1": 11,
    "datanode2": 12,
    "compute1": 21,
    "compute2": 22,
}
WORKSTATION = 254
SWITCH = "switch"
# The root namespace's end of the workstation link, and the routing table/rule that use it.
ROOT_LINK = "iosea-mh0"
ROUTE_TABLE = "150"
# Paths private to each host (a per-host directory is bind-mounted over each).
PRIVATE_PATHS = (
    "/etc/slurm",
    "/etc/munge",
    "/etc/ganesha",
    "/etc/iosea-wf",
    "/run",
    "/var/lib/iosea-wf",
    "/var/lib/munge",
    "/var/lib/slurm",
    "/var/log",
    "/var/spool",
    "/usr/local/bin",
    "/usr/local/libexec",
)
# Seconds any single wait of the harness may take.
TIMEOUT = 20
HOLDER_MARK = "iosea-mh-holder-"


def address(host: str) -> str:
    """The address of a host (or of the workstation)."""
    return f"{SUBNET}.{WORKSTATION if host == 'workstation' else HOSTS[host]}"


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command (argument list), bounded in time; raise with its stderr when it fails."""
    kw.setdefault("timeout", TIMEOUT)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if check and done.returncode != 0:
        raise SystemExit(f"harness: {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def host_dir(host: str) -> Path:
    """The per-host state directory."""
    return STATE / "hosts" / host


def _alive(pid: int) -> bool:
    """True when pid runs and is not a zombie (PID 1 here reaps slowly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def holder_pid(host: str) -> int | None:
    """The pid of the host's holder process, or None."""
    try:
        pid = int((host_dir(host) / "holder.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if cmdline.startswith((HOLDER_MARK + host).encode() + b"\0") and _alive(pid) else None


def nsenter(host: str, net: bool = True, mount: bool = True) -> list[str]:
    """The nsenter prefix that runs a command on ``host``."""
    pid = holder_pid(host)
    if pid is None:
        raise SystemExit(f"harness: host {host} is not up (run `harness.py up`)")
    argv = ["nsenter", "-t", str(pid)]
    if net:
        argv.append("--net")
    if mount:
        argv += ["--mount", "--uts"]
    return [*argv, "--"]


def start_holder(host: str, net: bool = True, mount: bool = True) -> int:
    """Start the holder of ``host`` if none runs; return its pid."""
    pid = holder_pid(host)
    if pid:
        return pid
    host_dir(host).mkdir(parents=True, exist_ok=True)
    flags = (["--net"] if net else []) + (["--mount", "--propagation", "slave", "--uts"] if mount else [])
    # exec -a gives the holder a name of its own: found again by its pid file and that name.
    proc = subprocess.Popen(
        ["unshare", *flags, "--", "bash", "-c", 'exec -a "$0" sleep infinity', HOLDER_MARK + host],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(HOLDER_MARK.encode()):
                break
        time.sleep(0.02)
    else:
        raise SystemExit(f"harness: the holder of {host} did not start")
    (host_dir(host) / "holder.pid").write_text(str(proc.pid))
    return proc.pid


def links_in(host: str) -> set[str]:
    """Names of the network links in a host's (or the switch's) namespace."""
    out = run([*nsenter(host, mount=False), "ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def build_switch() -> None:
    """The switch namespace with its bridge, and the workstation link from the root namespace."""
    start_holder(SWITCH, mount=False)
    sw = nsenter(SWITCH, mount=False)
    have = links_in(SWITCH)
    if "br0" not in have:
        run([*sw, "ip", "link", "add", "br0", "type", "bridge"])
    run([*sw, "ip", "link", "set", "lo", "up"])
    run([*sw, "ip", "link", "set", "br0", "up"])
    if "mh-ws" not in have:
        # Made in the switch namespace, the root end moved out: nothing half-made stays in root.
        run(
            [
                *sw,
                "ip",
                "link",
                "add",
                "mh-ws",
                "type",
                "veth",
                "peer",
                "name",
                ROOT_LINK,
                "netns",
                str(os.getpid()),
            ]
        )
    run([*sw, "ip", "link", "set", "mh-ws", "master", "br0", "up"])
    root_addr = f"{address('workstation')}/{PREFIX}"
    if root_addr not in run(["ip", "-o", "addr", "show", "dev", ROOT_LINK]).stdout:
        run(["ip", "addr", "add", root_addr, "dev", ROOT_LINK])
    run(["sysctl", "-q", "-w", f"net.ipv4.conf.{ROOT_LINK}.route_localnet=1"])
    run(["ip", "link", "set", ROOT_LINK, "up"])
    net = f"{SUBNET}.0/{PREFIX}"
    run(
        ["ip", "route", "replace", net, "dev", ROOT_LINK, "src", address("workstation"), "table", ROUTE_TABLE]
    )
    rules = run(["ip", "rule", "show"]).stdout
    if f"lookup {ROUTE_TABLE}" not in rules:
        # Before the local table (which delivers all of 127/8 to lo), for what this namespace
        # itself sends (iif lo) to the subnet only. The local rule moves from priority 0 to 1
        # without ever being absent: a rule added at an existing priority goes after it.
        if "1:\tfrom all lookup local" not in rules:
            run(["ip", "rule", "add", "pref", "1", "lookup", "local"])
        run(["ip", "rule", "add", "pref", "0", "to", net, "iif", "lo", "lookup", ROUTE_TABLE])
        with contextlib.suppress(SystemExit):
            run(["ip", "rule", "del", "pref", "0", "lookup", "local"])


def unbuild_root_routing() -> None:
    """Give the root namespace back its routing rules as they were, and remove its link."""
    rules = run(["ip", "rule", "show"]).stdout
    if not any(line.startswith("0:") and line.endswith("lookup local") for line in rules.splitlines()):
        run(["ip", "rule", "add", "pref", "0", "lookup", "local"])
    rules = run(["ip", "rule", "show"]).stdout
    if f"lookup {ROUTE_TABLE}" in rules:
        run(
            [
                "ip",
                "rule",
                "del",
                "pref",
                "0",
                "to",
                f"{SUBNET}.0/{PREFIX}",
                "iif",
                "lo",
                "lookup",
                ROUTE_TABLE,
            ]
        )
    if "1:\tfrom all lookup local" in run(["ip", "rule", "show"]).stdout:
        run(["ip", "rule", "del", "pref", "1", "lookup", "local"])
    run(["ip", "route", "flush", "table", ROUTE_TABLE], check=False)
    if run(["ip", "link", "show", ROOT_LINK], check=False).returncode == 0:
        run(["ip", "link", "del", ROOT_LINK])


def build_network(host: str) -> None:
    """The host's link to the switch, its address, and the loopback-range routing quirks."""
    pid = holder_pid(host)
    sw = nsenter(SWITCH, mount=False)
    me = nsenter(host, mount=False)
    port = f"mh-{host}"
    if "eth0" not in links_in(host):
        if port in links_in(SWITCH):
            run([*sw, "ip", "link", "del", port])
        run([*sw, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", str(pid)])
    run([*sw, "ip", "link", "set", port, "master", "br0", "up"])
    run([*me, "ip", "link", "set", "lo", "up"])
    # 127/8 is all local on lo by default: only 127.0.0.1 stays so, the subnet goes out of eth0.
    if "127.0.0.0/8" in run([*me, "ip", "route", "show", "table", "local"]).stdout:
        run([*me, "ip", "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local"])
    run(
        [
            *me,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.route_localnet=1",
            "net.ipv4.conf.eth0.route_localnet=1",
        ]
    )
    mine = f"{address(host)}/{PREFIX}"
    if mine not in run([*me, "ip", "-o", "addr", "show", "dev", "eth0"]).stdout:
        run([*me, "ip", "addr", "add", mine, "dev", "eth0"])
    run([*me, "ip", "link", "set", "eth0", "up"])


def mounted(pid: int) -> set[str]:
    """Mount points of the mount namespace of ``pid``."""
    text = Path(f"/proc/{pid}/mountinfo").read_text()
    return {line.split()[4] for line in text.splitlines()}


def build_mounts(host: str) -> None:
    """Bind the host's own directories over the private paths, and the cluster's /etc/hosts."""
    pid = holder_pid(host)
    enter = nsenter(host, net=False)
    have = mounted(pid)
    for path in PRIVATE_PATHS:
        if path in have:
            continue
        own = host_dir(host) / "root" / path.strip("/").replace("/", "_")
        own.mkdir(parents=True, exist_ok=True)
        if path == "/run":
            (own / "lock").mkdir(mode=0o1777, exist_ok=True)
            os.chmod(own / "lock", 0o1777)
            (own / "sshd").mkdir(mode=0o755, exist_ok=True)
        if path in ("/var/log", "/var/spool"):
            for sub in ("apt", "slurm", "munge") if path == "/var/log" else ():
                (own / sub).mkdir(exist_ok=True)
        if not os.path.isdir(path):
            raise SystemExit(f"harness: {path} does not exist on this machine: nothing to bind over")
        run([*enter, "mount", "--bind", str(own), path])
    if "/etc/hosts" not in have:
        run([*enter, "mount", "--bind", str(STATE / "hosts.cluster"), "/etc/hosts"])
    run([*enter, "hostname", host])


def write_cluster_files() -> None:
    """Keys (client, munge), /etc/hosts of the cluster, known_hosts."""
    ssh = STATE / "ssh"
    ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ssh / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "iosea-multihost", "-f", str(key)])
    auth = ssh / "authorized_keys"
    auth.write_text((ssh / "id_ed25519.pub").read_text())
    os.chmod(auth, 0o600)
    munge_key = STATE / "munge.key"
    if not munge_key.exists():
        run(["mungekey", "--create", f"--keyfile={munge_key}"])
        os.chmod(munge_key, 0o400)
    lines = ["127.0.0.1 localhost"] + [f"{address(h)} {h}" for h in HOSTS]
    (STATE / "hosts.cluster").write_text("\n".join(lines) + "\n")
    known = []
    for host in HOSTS:
        hk = host_dir(host) / "ssh_host_ed25519_key"
        host_dir(host).mkdir(parents=True, exist_ok=True)
        if not hk.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host}", "-f", str(hk)])
        kind, blob = (hk.with_suffix(".pub")).read_text().split()[:2]
        known.append(f"{host},{address(host)} {kind} {blob}")
    (ssh / "known_hosts").write_text("\n".join(known) + "\n")
    (STATE / "tiers").mkdir(exist_ok=True)


SSHD_CONFIG = """\
# sshd of the multi-host site's host {host} (written by tools/multihost/harness.py)
ListenAddress {address}
Port 22
HostKey {host_key}
PidFile /run/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
# root's ~/.bashrc runs pyenv init (0.5 s): bash reads ~/.bashrc for an ssh command only when
# SHLVL < 2, and it starts at SHLVL + 1.
SetEnv SHLVL=1
MaxStartups 64:30:128
MaxSessions 64
LogLevel ERROR
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def sshd_pid(host: str) -> int | None:
    """The pid of the host's sshd, or None."""
    try:
        pid = int((host_dir(host) / "root" / "run" / "sshd.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if comm == "sshd" and _alive(pid) else None


def start_sshd(host: str) -> None:
    """Start the host's sshd if it does not run."""
    conf = host_dir(host) / "sshd_config"
    text = SSHD_CONFIG.format(
        host=host,
        address=address(host),
        host_key=host_dir(host) / "ssh_host_ed25519_key",
        authorized_keys=STATE / "ssh" / "authorized_keys",
    )
    changed = not conf.exists() or conf.read_text() != text
    conf.write_text(text)
    pid = sshd_pid(host)
    if pid and not changed:
        return
    if pid:
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not _alive(pid), f"sshd of {host} to stop")
    run([*nsenter(host), "/usr/sbin/sshd", "-f", str(conf)])
    _wait(lambda: sshd_pid(host) is not None, f"sshd of {host} to start")


def _wait(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"harness: timed out waiting for {what}")
        time.sleep(0.05)


def check_ssh(hosts) -> None:
    """Every host answers over SSH, its host key checked (BatchMode, bounded)."""
    procs = {
        h: subprocess.Popen(
            [*ssh_argv(h), "true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for h in hosts
    }
    failed = []
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            err = "timed out"
        if proc.returncode != 0:
            failed.append(f"{host}: {err.strip()}")
    if failed:
        raise SystemExit("harness: ssh does not answer: " + "; ".join(failed))


def ssh_argv(host: str) -> list[str]:
    """An ssh command line to ``host`` as root, host key checked against the harness's known_hosts."""
    return [
        "ssh",
        "-i",
        str(STATE / "ssh" / "id_ed25519"),
        "-o",
        f"UserKnownHostsFile={STATE / 'ssh' / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        f"root@{address(host)}",
    ]


def up() -> None:
    """Build the whole site's hosts (what exists is kept)."""
    if not os.path.exists("/usr/sbin/sshd"):
        # Debian's policy-rc.d refuses to start it: every host starts its own below.
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "install", "-y", "-q", "openssh-server"], env=env, timeout=600)
    STATE.mkdir(parents=True, exist_ok=True)
    os.chmod(STATE, 0o755)
    write_cluster_files()
    build_switch()
    for host in HOSTS:
        start_holder(host)
        build_network(host)
        build_mounts(host)
        start_sshd(host)
    check_ssh(HOSTS)
    print(f"multihost: {len(HOSTS)} hosts up on {SUBNET}.0/{PREFIX}; state in {STATE}")


def namespace_pids(holder: int) -> list[int]:
    """Every process (but the holder) in the network or mount namespace of ``holder``."""
    targets = set()
    for kind in ("net", "mnt"):
        with contextlib.suppress(OSError):
            theirs = os.readlink(f"/proc/{holder}/ns/{kind}")
            # The switch has no mount namespace of its own: never match the machine's own ones.
            if theirs != os.readlink(f"/proc/self/ns/{kind}"):
                targets.add(theirs)
    if not targets:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == holder:
            continue
        for kind in ("net", "mnt"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/{kind}") in targets:
                    found.append(int(entry))
                    break
    return found


def down() -> None:
    """Stop every process of every host, the holders, the links; remove the state."""
    for host in [*HOSTS, SWITCH]:
        holder = holder_pid(host)
        if holder is None:
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = namespace_pids(holder)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(SystemExit):
                _wait(lambda pids=pids: not any(_alive(p) for p in pids), f"the processes of {host}", 5)
        os.kill(holder, signal.SIGKILL)
        _wait(lambda holder=holder: not _alive(holder), f"the holder of {host}", 5)
    unbuild_root_routing()
    if STATE.exists():
        shutil.rmtree(STATE)
    print("multihost: down")


def status(as_json: bool) -> int:
    """Print which hosts are up, with their sshd; 0 when all are."""
    rows = {h: {"address": address(h), "holder": holder_pid(h), "sshd": sshd_pid(h)} for h in HOSTS}
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for host, row in rows.items():
            print(f"{host:<11} {row['address']:<13} holder={row['holder']} sshd={row['sshd']}")
    return 0 if all(r["holder"] and r["sshd"] for r in rows.values()) else 1


def link(host: str, state: str) -> None:
    """Cut (down) or plug (up) the host's link on the switch."""
    run([*nsenter(SWITCH, mount=False), "ip", "link", "set", f"mh-{host}", state])


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    st = sub.add_parser("status")
    st.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec")
    ex.add_argument("host", choices=list(HOSTS))
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ln = sub.add_parser("link")
    ln.add_argument("host", choices=list(HOSTS))
    ln.add_argument("state", choices=["up", "down"])
    pi = sub.add_parser("pid")
    pi.add_argument("host", choices=list(HOSTS))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("harness: run as root (it makes namespaces and mounts)")
    if args.command == "up":
        up()
    elif args.command == "down":
        down()
    elif args.command == "status":
        return status(args.json)
    elif args.command == "exec":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            raise SystemExit("harness: exec HOST -- COMMAND ...")
        os.execvp("nsenter", [*nsenter(args.host), *command])
    elif args.command == "link":
        link(args.host, args.state)
    elif args.command == "pid":
        pid = holder_pid(args.host)
        if pid is None:
            return 1
        print(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
