"""What every privileged helper of iosea-wf checks, with root's eyes, before it acts.

The helpers (export-add, export-remove, tier-dir) are the only programs the Workflow Manager's
unprivileged account may run as root (a sudoers rule names each of them). The account is not
trusted: a compromised one may call a helper with any arguments. So each helper takes its site
facts from a root-owned file (helpers.json, written by the privileged_helpers role), never from
its arguments, and re-checks every argument: names in the safe form iosea-wf gives them, users
that are real people of the site (uid from min_uid to max_uid), a namespace that resolves, without a
symlink, strictly below one of the site's namespace roots and that its user may use, judged by the
kernel for that user's uid and groups (the rule of iosea_wf/permissions.py).

A refusal prints one line on stderr and exits 2; a failure of the action itself exits 1.
"""

import json
import os
import pwd
import re
import stat
import sys

CONFIG = "/etc/iosea-wf/helpers.json"
REFUSED = 2
# Export keys and tier names: what iosea_wf gives (manager._export_identity, wdf names).
KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
# What a path given to ganesha may not hold (iosea_wf.wdf.schema's rule: no quote, no ':').
_BAD_PATH_CHARS = set("\"'\\:`$")


class Refused(Exception):
    """The arguments are not something this helper does, whoever asks."""


def refuse_on_error(name, action):
    """Run ``action()``; a Refused or an OSError becomes one line on stderr and the exit code."""
    try:
        return action()
    except Refused as exc:
        print(f"iosea-wf helper {name}: refused: {exc}", file=sys.stderr)
        return REFUSED
    except OSError as exc:
        print(f"iosea-wf helper {name}: {exc}", file=sys.stderr)
        return 1


def _root_owned(path):
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise Refused(f"{path} must be owned by root and writable by root only")


def config():
    """The site facts (helpers.json), refused unless root owns it and its directory."""
    _root_owned(os.path.dirname(CONFIG))
    _root_owned(CONFIG)
    with open(CONFIG, encoding="utf-8") as handle:
        return json.load(handle)


def safe(value, regex, what):
    """``value`` when it matches ``regex`` and holds no '..', else Refused."""
    if not isinstance(value, str) or not regex.match(value) or ".." in value:
        raise Refused(f"{what} must be letters, digits, '_', '.', '-' (not starting with '.'), got {value!r}")
    return value


def site_user(name, conf):
    """The passwd entry of a real user of the site: not root, a system account, nobody or the service."""
    safe(name, USER_RE, "a user name")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise Refused(f"{name!r} is not a user of this host") from None
    low, high = int(conf.get("min_uid", 1000)), int(conf.get("max_uid", 60000))
    if not low <= entry.pw_uid <= high or name == conf.get("service_account"):
        raise Refused(f"{name} (uid {entry.pw_uid}) is not a user iosea-wf acts for")
    return entry


def user_may(entry, path, flags):
    """Whether the user of passwd ``entry`` may access ``path`` with ``flags``, by uid and groups.

    Asked in a child that takes the user's uid, gid and supplementary groups (root's own access
    says yes to nearly everything): mode bits, ACLs, read-only mounts and every parent count.
    """
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os._exit(0 if os.access(path, flags) else 1)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def seen_by(entry, path):
    """(realpath, is a directory) of ``path`` as the user of passwd ``entry`` resolves it (in a child)."""
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            real = os.path.realpath(path)
            os.write(write_end, json.dumps([real, os.path.isdir(real)]).encode())
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        said = handle.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"cannot resolve {path} as {entry.pw_name}")
    real, is_dir = json.loads(said)
    return real, is_dir


def check_path_text(path, what):
    """An absolute, normalized path without the characters ganesha or a bind mount would misread."""
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or os.path.normpath(path) != path
        or any(c in _BAD_PATH_CHARS or ord(c) < 32 or ord(c) == 127 for c in path)
    ):
        raise Refused(
            f"{what} must be an absolute normalized path without quotes, ':' or control characters, "
            f"got {path!r}"
        )
    return path


def namespace(path, entry, access, conf):
    """Refused unless ``path`` is a directory strictly below a namespace root that the user may use."""
    check_path_text(path, "a namespace")
    real = os.path.realpath(path)
    if real != path:
        raise Refused(f"namespace {path} goes through a symlink (it is {real})")
    if not os.path.isdir(path):
        raise Refused(f"namespace {path} is not an existing directory")
    roots = [os.path.realpath(r) for r in conf.get("namespace_roots", [])]
    if not any(r != "/" and path.startswith(r.rstrip("/") + "/") for r in roots):
        raise Refused(f"namespace {path} is not below one of the site's namespace roots ({', '.join(roots)})")
    flags = os.R_OK | os.X_OK | (os.W_OK if access == "RW" else 0)
    if not user_may(entry, path, flags):
        what = "readable and writable" if access == "RW" else "readable"
        raise Refused(f"namespace {path} is not {what} by {entry.pw_name} (uid and groups)")
    return path


def datanode_instance(name, conf):
    """The ganesha instance directory of a datanode the site declares."""
    safe(name, NAME_RE, "a datanode name")
    instances = conf.get("ganesha_instances", {})
    if name not in instances:
        raise Refused(f"{name} is not a datanode of this site ({', '.join(sorted(instances)) or 'none'})")
    return instances[name]


def run_control(conf, words):
    """Exec the ganesha control script (root's) with these words: its JSON and exit code are ours."""
    script = conf["ganesha_control"]
    _root_owned(script)
    os.execv("/usr/bin/python3", ["/usr/bin/python3", "-I", script, *words])
