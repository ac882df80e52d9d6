"""A warm ``ansible-playbook`` for the orchestrator: ansible-runner's ``binary``, served by a fork server.

Why: a cold ``ansible-playbook`` spends about 0.4 s importing Ansible and reading its
configuration before it reads the playbook. That is most of what ``iosea-wf run`` costs over a
plain ``sbatch``. The orchestrator therefore hands ansible-runner this module's console script
(``iosea-wf-ansible-playbook``) as the ``binary`` to run. The script is a small client:

- it connects to a per-user server (a Unix socket in a 0700 directory of the user's own) and
  passes it its argument list, environment, working directory and its stdin/stdout/stderr (the
  file descriptors themselves, ``SCM_RIGHTS``); the server, which imported Ansible once (and
  loaded the plugins and collection routing every run needs, :func:`_preload`), forks a
  child that becomes ``ansible-playbook`` with exactly those, in its own process group; the
  client forwards SIGINT/SIGTERM/SIGHUP to that group and exits with the child's exit status;
- when no server answers, or the server's Ansible configuration would differ from the run's
  (any ``ANSIBLE_*`` variable, HOME, the user, the working directory, the Python or Ansible
  installation), it simply ``exec``s the real ``ansible-playbook`` (the cold path), after
  starting a server in the background for the next run.

ansible-runner sees an ordinary ansible-playbook process: events, artifacts, return codes and
cancellation are unchanged. Safety: the socket lives in ``$XDG_RUNTIME_DIR`` or
``/tmp/iosea-wf-<uid>`` (created 0700, refused when owned by someone else or open to others),
and the server serves only peers of its own uid (``SO_PEERCRED``). If the client is killed
(even ``kill -9``), the server kills the child's process group: nothing runs on unattended.
The server exits after ``IOSEA_WF_WARM_ANSIBLE`` seconds without work (default 300);
``IOSEA_WF_WARM_ANSIBLE=0`` turns the warm path off (every run is cold).

Only the standard library is imported by the client: its start-up must stay cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time

IDLE_ENV = "IOSEA_WF_WARM_ANSIBLE"
DEFAULT_IDLE = 300.0
SOCKET_ENV = "IOSEA_WF_WARM_SOCKET"  # set by the client for the server it spawns (tests read it)
# Variables ansible-runner sets per run; Ansible reads them when a run uses them, not at import.
PER_RUN = frozenset({"ANSIBLE_CACHE_PLUGIN_CONNECTION"})
KEY_VARS = ("HOME", "USER", "LOGNAME", "PYTHONPATH", "PYTHONHASHSEED")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KILL_GRACE = 5.0
MAX_HEADER = 1 << 20
# Built-in plugins every run of the orchestrator's playbooks loads (connection, shell, strategy,
# the inventory plugins Ansible enables by default, ansible-runner's fact cache): the server loads
# their code and configuration definitions (a YAML document each) once, before it forks any run.
# Only plugins whose module has no per-run state at import: never a callback (ansible-runner's
# reads its environment when imported) nor a vars plugin (its loader caches what it returns).
PRELOADED = {
    "connection": ("local", "ssh"),
    "shell": ("sh",),
    "strategy": ("linear",),
    "inventory": ("host_list", "script", "auto", "yaml", "ini", "toml"),
    "cache": ("jsonfile",),
}
# What ansible-playbook's own start-up says when the server already set the collection loader up.
_ALREADY_CONFIGURED = "AnsibleCollectionFinder has already been configured"


def idle_seconds(env: dict[str, str] | None = None) -> float:
    """The server's idle lifetime from ``IOSEA_WF_WARM_ANSIBLE`` (0 or invalid -> off / default)."""
    raw = (env if env is not None else os.environ).get(IDLE_ENV, "")
    if not raw:
        return DEFAULT_IDLE
    try:
        return max(0.0, float(raw))
    except ValueError:
        return DEFAULT_IDLE


def real_playbook() -> str:
    """The real ansible-playbook of this Python installation."""
    return os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


def _installation_stamp() -> str:
    """Changes when Python, Ansible or this module are replaced: a new server is then used."""
    parts = [sys.executable, __file__]
    import importlib.util

    spec = importlib.util.find_spec("ansible")
    if spec and spec.origin:
        parts.append(os.path.join(os.path.dirname(spec.origin), "release.py"))
    stamp = []
    for path in parts:
        try:
            st = os.stat(path)
            stamp.append(f"{path}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            stamp.append(f"{path}:missing")
    return "|".join(stamp)


def config_key(env: dict[str, str], cwd: str) -> str:
    """What Ansible reads when it is imported: runs with the same key can share one server."""
    relevant = {k: v for k, v in env.items() if k.startswith("ANSIBLE_") and k not in PER_RUN}
    relevant.update({k: env[k] for k in KEY_VARS if k in env})
    blob = json.dumps([sorted(relevant.items()), cwd, os.getuid(), _installation_stamp()])
    return hashlib.sha256(blob.encode()).hexdigest()


def runtime_dir() -> str | None:
    """A directory only this user can enter, or None when none can be had safely."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/iosea-wf-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    try:
        st = os.lstat(base)
    except OSError:
        return None
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return base


def socket_path(key: str) -> str | None:
    base = runtime_dir()
    return os.path.join(base, f"ansible-{key[:20]}.sock") if base else None


# --- framing: a 4-byte length then JSON --------------------------------------------------------


def _frame(obj: object) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def _read_line(sock: socket.socket, buf: bytearray) -> str | None:
    """One newline-terminated reply line from the server, or None at EOF."""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


# --- client -------------------------------------------------------------------------------------


def _spawn_server(path: str, idle: float) -> None:
    """Start a server for this configuration in the background (detached: it outlives this run)."""
    import subprocess

    log = path[: -len(".sock")] + ".log"
    with contextlib.suppress(OSError), open(log, "wb") as out:
        subprocess.Popen(
            [sys.executable, "-m", "iosea_wf.warm_playbook", "serve", path, str(idle)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
            env=dict(os.environ, **{SOCKET_ENV: path}),
        )


def _run_warm(path: str, argv: list[str]) -> int | None:
    """Run through the server; None when it cannot serve (the caller then runs cold)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    ignored = [int(s) for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]
    umask = os.umask(0o022)
    os.umask(umask)
    header = _frame(
        {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "ignored": ignored, "umask": umask}
    )
    buf = bytearray()
    try:
        sent = socket.send_fds(sock, [header], [0, 1, 2])
        sock.sendall(header[sent:])
        reply = _read_line(sock, buf)
    except OSError:
        reply = None
    if not reply or not reply.startswith("started "):
        sock.close()
        return None  # refused (other configuration) or the server went away before forking
    child = int(reply.split()[1])

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signum)

    for sig in FORWARDED:
        if int(sig) not in ignored:
            signal.signal(sig, forward)
    while True:
        try:
            line = _read_line(sock, buf)
            break
        except InterruptedError:
            continue
    sock.close()
    if line and line.startswith("exit "):
        return int(line.split()[1])
    print("iosea-wf-ansible-playbook: the warm server ended before the run", file=sys.stderr)
    return 1


def main() -> None:
    """Console script ``iosea-wf-ansible-playbook``: ansible-playbook, warm when possible."""
    argv = sys.argv[1:]
    idle = idle_seconds()
    path = socket_path(config_key(dict(os.environ), os.getcwd())) if idle > 0 else None
    if path:
        code = _run_warm(path, argv)
        if code is not None:
            sys.exit(code)
        _spawn_server(path, idle)
    binary = real_playbook()
    os.execv(binary, [binary, *argv])


# --- server -------------------------------------------------------------------------------------


class _Run:
    def __init__(self, conn: socket.socket, pid: int):
        self.conn = conn
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.kill_at: float | None = None


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    data = bytearray(msg)
    while len(data) < 4:
        more = conn.recv(65536)
        if not more:
            raise ConnectionError("short header")
        data += more
    (size,) = struct.unpack("!I", data[:4])
    if size > MAX_HEADER:
        raise ConnectionError("header too large")
    while len(data) < 4 + size:
        more = conn.recv(65536)
        if not more:
            raise ConnectionError("short header")
        data += more
    return json.loads(data[4 : 4 + size]), list(fds)


def _become_playbook(request: dict, fds: list[int], listener: socket.socket, conn: socket.socket) -> None:
    """In the forked child: take the client's stdio, environment and cwd, and run ansible-playbook."""
    code = 250
    try:
        os.setpgid(0, 0)
        listener.close()
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        # Nothing else of the server's (its socket, other runs' connections and pidfds) may live
        # on in a run: a client would otherwise not see the server go away.
        os.closerange(3, 65536)
        for sig in (signal.SIGTERM, signal.SIGCHLD, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in request.get("ignored", []):
            signal.signal(sig, signal.SIG_IGN)
        os.umask(int(request.get("umask", 0o022)))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = ["ansible-playbook", *request["argv"]]
        sys.argv = argv
        import warnings

        # The server set the collection loader up (_preload), with this very configuration.
        warnings.filterwarnings("ignore", message=_ALREADY_CONFIGURED)
        from ansible.cli.playbook import main as playbook_main

        try:
            playbook_main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # report anything to the run's own stderr, then exit with a failure
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _preload() -> str:
    """Load once what every run would load again (about 0.13 s a run); return what was loaded.

    The collection loader with the routing of ``ansible.builtin`` (a large YAML file Ansible parses
    on first use), and the :data:`PRELOADED` plugins with their configuration definitions. A run's
    own configuration is the server's (:func:`config_key`), so what it would have loaded is this.
    """
    from ansible.plugins import loader
    from ansible.utils.collection_loader._collection_finder import _get_collection_metadata

    # What ansible-playbook's CLI.run does first (ansible-playbook has no --collections-path).
    loader.init_plugin_loader([])
    _get_collection_metadata("ansible.builtin")
    loaded = []
    for kind, names in PRELOADED.items():
        plugins = getattr(loader, f"{kind}_loader")
        for name in names:
            if plugins.get(name, class_only=True) is not None:
                loaded.append(f"{kind}/{name}")
    return ", ".join(loaded)


def serve(path: str, idle: float) -> int:
    """Serve runs on ``path`` until ``idle`` seconds pass without one. Returns an exit code."""
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another server holds this socket
    key = config_key(dict(os.environ), os.getcwd())
    if socket_path(key) != path:
        print(f"refusing to serve {path}: this process's configuration key differs", file=sys.stderr)
        return 2
    import ansible.cli.playbook  # noqa: F401  (the warm-up: this is what every run saves)

    try:
        preloaded = _preload()
    except Exception as exc:  # the runs then load it all themselves, as a cold run does
        preloaded = f"nothing ({type(exc).__name__}: {exc})"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    runs: dict[int, _Run] = {}  # keyed by pidfd
    by_conn: dict[int, _Run] = {}
    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    last_work = time.monotonic()
    print(f"{time.strftime('%F %T')} serving {path} (pid {os.getpid()}, idle {idle:g}s)", flush=True)
    print(f"{time.strftime('%F %T')} preloaded: {preloaded}", flush=True)
    try:
        while not stopping:
            now = time.monotonic()
            if not runs and now - last_work > idle:
                break
            for run in runs.values():
                if run.kill_at is not None and now >= run.kill_at:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(run.pid, signal.SIGKILL)
                    run.kill_at = None
            watched = [listener, *(r.conn for r in runs.values()), *(r.pidfd for r in runs.values())]
            try:
                ready, _, _ = select.select(watched, [], [], 1.0)
            except InterruptedError:
                continue
            for item in ready:
                if item is listener:
                    _accept(listener, runs, by_conn)
                    last_work = time.monotonic()
                elif isinstance(item, int):
                    _reap(runs.pop(item), by_conn)
                    last_work = time.monotonic()
                else:
                    run = by_conn.get(item.fileno())
                    if run and run.kill_at is None and not _peek_open(item):
                        # The client is gone (killed): nobody waits for this run any more.
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(run.pid, signal.SIGTERM)
                        run.kill_at = time.monotonic() + KILL_GRACE
    finally:
        for run in runs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGTERM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener.close()
        print(f"{time.strftime('%F %T')} stopped", flush=True)
    return 0


def _peek_open(conn: socket.socket) -> bool:
    """False once the peer closed its end."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _accept(listener: socket.socket, runs: dict[int, _Run], by_conn: dict[int, _Run]) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            conn.close()
            return
        conn.settimeout(5.0)
        request, fds = _receive_request(conn)
        conn.settimeout(None)
        if len(fds) != 3 or config_key(request["env"], request["cwd"]) != config_key(
            dict(os.environ), os.getcwd()
        ):
            conn.sendall(b"refused other-configuration\n")
            raise ConnectionError("refused")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _become_playbook(request, fds, listener, conn)
        run = _Run(conn, pid)
        runs[run.pidfd] = run
        by_conn[conn.fileno()] = run
        conn.sendall(f"started {pid}\n".encode())
        books = [a for a in request["argv"] if a.endswith((".yml", ".yaml"))]
        print(f"{time.strftime('%F %T')} run {pid}: {' '.join(books) or '?'}", flush=True)
    except (OSError, ValueError, KeyError, ConnectionError):
        conn.close()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _reap(run: _Run, by_conn: dict[int, _Run]) -> None:
    _, status = os.waitpid(run.pid, 0)
    os.close(run.pidfd)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    print(f"{time.strftime('%F %T')} run {run.pid} ended: {code}", flush=True)
    by_conn.pop(run.conn.fileno(), None)
    with contextlib.suppress(OSError):
        run.conn.sendall(f"exit {code}\n".encode())
    run.conn.close()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "serve":
    sys.exit(serve(sys.argv[2], float(sys.argv[3])))
