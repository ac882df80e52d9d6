"""The probe `iosea-wf site check` runs on each host of a site: what that host alone can tell, as JSON.

One run per host. On a host with ``ansible_connection: local`` it is called in-process
(:func:`probe`); on any other host its source is sent over SSH to the host's Python
(``python3 -I - REQUEST``: the program on stdin, the request as one argument) and it prints one
JSON object. It therefore imports the standard library only, runs on any Python 3.7+, and depends
on no shell startup file, PATH entry or environment variable of the remote user.

It reports facts and judges only what is local to the host (is this tier writable here, does this
ganesha answer here); what needs every host (is the munge key the same everywhere, are the clocks
together, what Slurm says of each node) is decided by :mod:`iosea_wf.site_check`.

The munge key never leaves the host: only ``HMAC-SHA256(nonce, key)`` does, with a nonce the
checker draws for this run, so the value compared says nothing usable about the key, nor about
it in another run.
"""

from __future__ import annotations

import fcntl
import hmac
import http.client
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from urllib.parse import urlsplit

PROBE_VERSION = 1
# Standard places of the tools, whatever PATH the remote user's environment has.
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The MOUNT RPC program a ganesha serves on its mount port (NFS itself is probed by a real listing).
MOUNT_PROGRAM = 100005
PORTMAPPER_PROGRAM = 100000  # rpcbind, which a ganesha needs to start


def _tool(name):
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + TOOL_PATH)


def _left(deadline, floor=0.2):
    return max(floor, deadline - time.monotonic())


def _said(proc):
    return " ".join((proc.stderr or proc.stdout or "").split())[:300]


def _run(argv, deadline, stdin=None):
    """(CompletedProcess or None, why not) of a bounded command."""
    tool = _tool(argv[0])
    if tool is None:
        return None, f"{argv[0]} is not installed"
    try:
        done = subprocess.run(
            [tool, *argv[1:]],
            input=stdin,
            capture_output=True,
            timeout=_left(deadline),
            check=False,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return None, f"{argv[0]} did not answer in time"
    except OSError as exc:
        return None, f"{argv[0]}: {exc.strerror}"
    return done, ""


def munge(request, nonce, deadline):
    """The key's HMAC with this run's nonce (never the key), and whether munged encodes and decodes."""
    found = {}
    path = request.get("key_file") or "/etc/munge/munge.key"
    try:
        with open(path, "rb") as handle:
            key = handle.read()
        found["key_hmac"] = hmac.new(bytes.fromhex(nonce), key, "sha256").hexdigest()
        found["key_bytes"] = len(key)
    except OSError as exc:
        found["key_error"] = f"cannot read the munge key {path}: {exc.strerror}"
    socket_args = ["--socket", request["socket"]] if request.get("socket") else []
    made, why = _run(["munge", "--no-input", *socket_args], deadline)
    if made is None or made.returncode != 0:
        found["munged_error"] = f"munged does not encode: {why or _said(made)}"
        return found
    decoded, why = _run(["unmunge", "--no-output", *socket_args], deadline, stdin=made.stdout)
    if decoded is None or decoded.returncode != 0:
        found["munged_error"] = f"munged does not decode its own credential: {why or _said(decoded)}"
    return found


def tiers(request):
    """Each tier here: present, a directory, really writable (a file made and removed), enterable by all."""
    found = []
    for tier in request:
        path = tier["path"]
        entry = {"name": tier["name"], "path": path}
        found.append(entry)
        try:
            info = os.stat(path)
        except OSError as exc:
            entry["error"] = f"missing ({exc.strerror})"
            continue
        if not stat.S_ISDIR(info.st_mode):
            entry["error"] = "not a directory"
            continue
        entry["mode"] = format(stat.S_IMODE(info.st_mode), "04o")
        try:
            vfs = os.statvfs(path)
            entry["free_bytes"] = vfs.f_bavail * vfs.f_frsize
        except OSError:
            pass
        probe_file = os.path.join(path, f".iosea-site-check-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, b"iosea-wf site check\n")
            finally:
                os.close(fd)
                os.unlink(probe_file)
        except OSError as exc:
            entry["error"] = f"not writable: {exc.strerror}"
            continue
        if not info.st_mode & stat.S_IXOTH:
            # Data movers run as the users: they go through the tier to their TIER/USER directory.
            entry["error"] = f"mode {entry['mode']}: other users cannot enter it (their data movers need o+x)"
    return found


def _alive(pid, name):
    """True if process `pid` runs `name` and is not a zombie (PID 1 may reap slowly)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return False
    comm = text[text.index("(") + 1 : text.rindex(")")]
    state = text[text.rindex(")") + 2 :].split()[0]
    return state not in ("Z", "X") and name.startswith(comm)


_RPC_ACCEPT = {1: "program unavailable", 2: "program version mismatch", 3: "procedure unavailable"}


def rpc_null(address, port, program, version, timeout):
    """Why an ONC RPC NULL call to ``program``/``version`` at ``address:port`` (TCP) fails, or "".

    Sent straight to the port, not through rpcbind: every ganesha of a machine registers with
    the one rpcbind and unregisters when it stops, so rpcbind's map (and ``rpcinfo -n``, which
    still consults it) is wrong on a machine with several instances.
    """
    import struct

    xid = int.from_bytes(secrets.token_bytes(4), "big")
    # call: xid, CALL, RPC version 2, program, version, procedure 0 (NULL), AUTH_NONE cred and verifier
    body = struct.pack(">10I", xid, 0, 2, int(program), int(version), 0, 0, 0, 0, 0)
    try:
        with socket.create_connection((address, int(port)), timeout=timeout) as sock:
            sock.sendall(struct.pack(">I", 0x80000000 | len(body)) + body)
            reply = b""
            while len(reply) < 4 + 24:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        return getattr(exc, "strerror", None) or str(exc)
    if len(reply) < 4 + 24:
        return "no RPC reply"
    got_xid, kind, stat_, _flavor, length = struct.unpack(">5I", reply[4:24])
    if got_xid != xid or kind != 1:
        return "not an RPC reply"
    if stat_ != 0:
        return "RPC call denied"
    accept = struct.unpack(">I", reply[24 + length : 28 + length])[0] if len(reply) >= 28 + length else None
    if accept != 0:
        return _RPC_ACCEPT.get(accept, f"RPC accept status {accept}")
    return ""


def _port_taken(address, port, timeout=0.5):
    try:
        socket.create_connection((address, int(port)), timeout=timeout).close()
    except OSError:
        return False
    return True


def _shared_lock(directory, deadline):
    """A shared flock of the instance (its control script holds it exclusively for every command).

    So the probe never sees an export written whose server is still starting. None (probed
    without it) when the instance has no lock file or a command holds it past the deadline.
    """
    try:
        fd = os.open(os.path.join(directory, ".lock"), os.O_RDONLY)
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline - 1:
                os.close(fd)
                return None
            time.sleep(0.05)


def ganesha(request, deadline):
    """This datanode's nfs-ganesha instance: answering (a real NFSv4 listing and a MOUNT call), or idle.

    The instance starts with its first export and stops with its last (roles/nfs_ganesha): a
    datanode without an export has no server to ask, so it is idle, and ready when rpcbind
    answers, ganesha.nfsd is installed and nothing else holds its ports.
    """
    lock = _shared_lock(request["instance_dir"], deadline)
    try:
        return _ganesha(request, deadline)
    finally:
        if lock is not None:
            os.close(lock)


def _ganesha(request, deadline):
    directory = request["instance_dir"]
    address, port, mount_port = request["address"], int(request["port"]), int(request["mount_port"])
    found = {"address": address, "port": port, "mount_port": mount_port}
    problems = []
    try:
        with open(os.path.join(directory, "instance.json"), encoding="utf-8") as handle:
            settings = json.load(handle)
    except (OSError, ValueError) as exc:
        found["error"] = f"no prepared instance at {directory} ({getattr(exc, 'strerror', None) or exc})"
        return found
    drift = [
        f"{key} {settings.get(key)!r} where the inventory says {want!r}"
        for key, want in (("address", address), ("port", port), ("mount_port", mount_port))
        if settings.get(key) != want
    ]
    if drift:
        problems.append(f"{directory}/instance.json has " + ", ".join(drift) + " (run the site playbook)")
    try:
        exports = [n for n in os.listdir(os.path.join(directory, "exports.d")) if n.endswith(".conf")]
    except OSError:
        exports = []
    found["exports"] = len(exports)
    pid = None
    try:
        with open(os.path.join(directory, "ganesha.pid"), encoding="utf-8") as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        pass
    if pid and _alive(pid, "ganesha.nfsd"):
        found["pid"] = pid
        url = f"nfs://{address}/?version=4&nfsport={port}"
        listed, why = _run(["nfs-ls", url], deadline)
        if listed is None or listed.returncode != 0:
            problems.append(
                f"nothing answers NFSv4 at {address}:{port} ({why or _said(listed) or 'nfs-ls failed'})"
            )
        why = rpc_null(address, mount_port, MOUNT_PROGRAM, 3, min(5.0, _left(deadline)))
        if why:
            problems.append(f"nothing answers MOUNT v3 at {address}:{mount_port} ({why})")
        found["state"] = "running"
    elif exports:
        found["state"] = "down"
        problems.append(
            f"ganesha is not running, yet {len(exports)} export(s) are configured in {directory}/exports.d"
        )
    else:
        found["state"] = "idle"
        if _tool("ganesha.nfsd") is None:
            problems.append("ganesha.nfsd is not installed")
        why = rpc_null("127.0.0.1", 111, PORTMAPPER_PROGRAM, 4, min(5.0, _left(deadline)))
        if why:
            problems.append(f"rpcbind does not answer at 127.0.0.1:111 ({why}): ganesha could not start")
        for which in (port, mount_port):
            if _port_taken(address, which):
                problems.append(f"another process listens on {address}:{which}: ganesha could not start")
    if problems:
        found["error"] = "; ".join(problems)
    return found


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("iosea-wm", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def workflow_manager(url, timeout):
    """Whether the Workflow Manager at ``url`` (unix:///PATH or http://HOST:PORT) answers its API document."""
    parts = urlsplit(url)
    started = time.monotonic()
    try:
        if parts.scheme == "unix":
            conn = _UnixHTTPConnection(parts.path, timeout)
        elif parts.scheme == "http" and parts.hostname and parts.port:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        else:
            return {"error": f"not a Workflow Manager URL (unix:///PATH or http://HOST:PORT): {url}"}
        try:
            # The API document needs no credential: this asks whether the service answers, not who we are.
            conn.request("GET", "/v1/openapi.json")
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return {"error": f"no answer at {url}: {getattr(exc, 'strerror', None) or exc}"}
    seconds = time.monotonic() - started
    if answer.status != 200:
        return {"error": f"{url} answers HTTP {answer.status} to GET /v1/openapi.json"}
    try:
        info = json.loads(body)["info"]
    except (ValueError, KeyError, TypeError):
        return {"error": f"{url} answers, but not with the Workflow Manager's API document"}
    return {"title": str(info.get("title")), "version": str(info.get("version")), "seconds": seconds}


def run_argv(argv, deadline):
    """Run a command the checker asked for (the Slurm query iosea_wf.slurm builds); return its answer."""
    done, why = _run(argv, deadline)
    if done is None:
        return {"argv": argv, "error": why}
    return {"argv": argv, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def probe(request):
    """Everything the request asks of this host; ``time`` is this host's clock at the end."""
    deadline = time.monotonic() + float(request.get("timeout", 10))
    found = {"probe": PROBE_VERSION, "hostname": socket.gethostname(), "uid": os.geteuid()}
    if "munge" in request:
        found["munge"] = munge(request["munge"], request["nonce"], deadline)
    if request.get("tiers"):
        found["tiers"] = tiers(request["tiers"])
    if request.get("ganesha"):
        found["ganesha"] = ganesha(request["ganesha"], deadline)
    if request.get("wm"):
        found["wm"] = workflow_manager(request["wm"], _left(deadline))
    if request.get("run"):
        found["run"] = {name: run_argv(argv, deadline) for name, argv in request["run"].items()}
    found["time"] = time.time()
    return found


def main(argv=None):
    """``python3 - REQUEST_JSON``: print the probe's JSON answer on one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        request = json.loads(args[0])
    except (IndexError, ValueError) as exc:
        print(f"iosea-wf site probe: expected one JSON request argument: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(probe(request), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
