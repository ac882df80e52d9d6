"""The ``iosea-wf`` command line: parsing and printing only.

Both forms work: the design note's ``KEY=VALUE`` words (``WORKFLOW=wdf.yaml SESSION=s1 NS1=/data``)
and conventional options (``-w wdf.yaml -s s1 -d NS1=/data``). Every error is an
:class:`~iosea_wf.errors.IoseaError` caught here once and turned into its documented exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, IoseaError, UsageError, error_body

PROG = "iosea-wf"
KEYWORDS = {"WORKFLOW": "workflow", "SESSION": "session", "STEP": "step"}
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)

EXIT_TABLE = "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


def _version() -> str:
    """The installed distribution's version (what pip installed, not a copy kept in the code)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iosea-wf")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _VersionAction(argparse.Action):
    """--version: the installed version, looked up only when asked (importlib.metadata is slow)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"{PROG} {_version()}\n")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so one place maps errors to exit codes."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument(
        "--site",
        metavar="DIR",
        default=default,
        help="site inventory directory (env IOSEA_WF_SITE; default: local)",
    )
    g.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default,
        help="where sessions are recorded (env IOSEA_WF_HOME; default: $XDG_STATE_HOME/iosea-wf)",
    )
    g.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS if suppress else False, help="print JSON"
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if suppress else 0,
        help="show Ansible's output",
    )
    return p


def _assignments(p: argparse.ArgumentParser, *, workflow=False, session=False, step=False) -> None:
    if workflow:
        p.add_argument(
            "-w", "--workflow", metavar="FILE", help="the Workflow Description File (or WORKFLOW=FILE)"
        )
    if session:
        p.add_argument("-s", "--session", metavar="NAME", help="the session name (or SESSION=NAME)")
    if step:
        p.add_argument("-t", "--step", metavar="STEP", help="the step name (or STEP=NAME)")
    if workflow:
        p.add_argument(
            "-d",
            "--define",
            metavar="NAME=value",
            action="append",
            default=[],
            help="give a WDF variable (or plain NAME=value)",
        )
    p.add_argument("words", nargs="*", metavar="KEY=VALUE", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    common = _common_options(suppress=False)
    sub_common = _common_options(suppress=True)
    parser = _Parser(
        prog=PROG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Drive a session of an HPC workflow described in a Workflow Description File (WDF):\n"
            "ephemeral I/O services on datanodes, data movers and Slurm steps.\n\n"
            "  iosea-wf validate WORKFLOW=wdf.yaml NS1=/data/ns1\n"
            "  iosea-wf start WORKFLOW=wdf.yaml SESSION=s1 NS1=/data/ns1 NS2=/data/ns2\n"
            "  iosea-wf status SESSION=s1\n"
            "  iosea-wf list\n"
            "  iosea-wf share SESSION=s1 USER=bob --mode rw\n"
            "  iosea-wf stop SESSION=s1"
        ),
        epilog=EXIT_TABLE,
    )
    parser.add_argument("--version", action=_VersionAction, help="show program's version number and exit")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    p = subs.add_parser(
        "validate",
        parents=[sub_common],
        formatter_class=fmt,
        help="check a WDF against the site, without starting anything",
        description=(
            "Check a WDF: YAML, sections, names, references, variables, and what the site offers.\n"
            "Every problem is reported at once with file:line:column and key path. SESSION is\n"
            "filled with a placeholder unless SESSION= is given.\n\n"
            "  iosea-wf validate WORKFLOW=wdf.yaml NS1=/data/ns1 NS2=/data/ns2"
        ),
        epilog="exit 0: valid; exit 2: invalid (every problem listed)",
    )
    _assignments(p, workflow=True, session=True)

    p = subs.add_parser(
        "show",
        parents=[sub_common],
        help="what the site offers: locations, flavors or tiers",
        description="Print what the site inventory offers to workflows.",
    )
    p.add_argument("what", choices=["locations", "flavors", "tiers"])

    p = subs.add_parser(
        "start",
        parents=[sub_common],
        formatter_class=fmt,
        help="validate a WDF and start a session with its ephemeral services",
        description=(
            "Validate the WDF against the site, check the session name is free for you, then\n"
            "provision every ephemeral service on a datanode (in parallel) and record the session.\n"
            "If a service fails, those already started are torn down and the session is FAILED.\n"
            "Each service holds a Slurm allocation on its datanode (job iosea.SESSION.svc.SERVICE,\n"
            "the flavor's cores and memory, yours): when Slurm does not run them within seconds\n"
            "the start is refused (exit 6), unless --wait-resources lets it wait.\n\n"
            "  iosea-wf start WORKFLOW=wdf.yaml SESSION=s1 NS1=/data/ns1 NS2=/data/ns2"
        ),
        epilog=EXIT_TABLE,
    )
    _assignments(p, workflow=True, session=True)
    p.add_argument(
        "--wait-resources",
        metavar="DURATION",
        help="wait up to DURATION (90s, 30m, 12h, 7d) for the datanodes' resources in Slurm",
    )

    p = subs.add_parser(
        "stop",
        parents=[sub_common],
        formatter_class=fmt,
        help="tear every ephemeral service of a session down",
        description=(
            "Tear down every ephemeral service of the session and release its datanode resources.\n"
            "Stopping a FAILED or half-started session cleans whatever exists.\n\n"
            "  iosea-wf stop SESSION=s1"
        ),
    )
    _assignments(p, session=True)
    p.add_argument(
        "--force", action="store_true", help="stop even a session another process is still starting"
    )

    p = subs.add_parser(
        "run",
        parents=[sub_common],
        formatter_class=fmt,
        help="run a step: its data movers and its Slurm job, with the services attached",
        description=(
            "Submit a step of an ACTIVE session to Slurm as a chain of jobs: the step_start data\n"
            "movers of its services, then the step's own sbatch command (run from this directory,\n"
            "on its module's partition, with its services attached), then its step_stop data\n"
            "movers, which run only if the step COMPLETED. Returns once submitted and prints the\n"
            "job ids; --wait follows the chain to its end and exits with the step's result.\n"
            "Running a step again creates a new instance.\n\n"
            "  iosea-wf run SESSION=s1 STEP=step_B --wait"
        ),
        epilog=EXIT_TABLE,
    )
    _assignments(p, session=True, step=True)
    p.add_argument(
        "--wait", action="store_true", help="follow the step to its end; exit 1 unless it COMPLETED"
    )

    p = subs.add_parser(
        "access",
        parents=[sub_common],
        formatter_class=fmt,
        help="an interactive Slurm allocation with every service of the session attached",
        description=(
            "Open a Slurm allocation (salloc) with all the session's services attached the way a\n"
            "step gets them (environment and mountpoints), on the site's interactive partition\n"
            "unless --partition says otherwise. Without COMMAND: an interactive shell. With\n"
            "-- COMMAND ...: runs it there and exits with its exit code. While it lives, `status`\n"
            "shows it and `stop` waits for it.\n\n"
            "  iosea-wf access SESSION=s1\n"
            "  iosea-wf access SESSION=s1 --cores 4 --time 30 -- ls /mnt/data"
        ),
        epilog=EXIT_TABLE + "\n  (with -- COMMAND, the command's own exit code is returned)",
    )
    _assignments(p, session=True)
    p.add_argument("--nodes", type=int, metavar="N", help="number of nodes")
    p.add_argument("--cores", type=int, metavar="C", help="cores (cpus per task)")
    p.add_argument("--time", metavar="T", help="time limit, Slurm syntax (e.g. 30, 1:00:00)")
    p.add_argument("--partition", metavar="P", help="partition (default: the site's interactive partition)")
    p.add_argument("--immediate", action="store_true", help="fail at once if the resources are busy")

    p = subs.add_parser(
        "cancel",
        parents=[sub_common],
        formatter_class=fmt,
        help="cancel what `run` started and has not finished",
        description=(
            "Cancel, in one batched scancel, the unfinished jobs of a step's latest instance\n"
            "(or --instance N), or of every step run of the session when no STEP is given:\n"
            "pending data movers, the step job, its step_stop data movers. A data mover in\n"
            "progress stops cleanly (a cancelled move loses nothing). The session stays ACTIVE.\n\n"
            "  iosea-wf cancel SESSION=s1 STEP=step_B"
        ),
    )
    _assignments(p, session=True, step=True)
    p.add_argument("--instance", type=int, metavar="N", help="the step instance (default: the latest)")

    p = subs.add_parser(
        "list", parents=[sub_common], help="your sessions", description="List your live sessions."
    )
    p.add_argument("--all", action="store_true", help="include stopped and failed sessions")

    p = subs.add_parser(
        "status",
        parents=[sub_common],
        help="a session, its services and their connection information",
        description=(
            "Show a session and its ephemeral services with their state and connection information. "
            "Each ACTIVE service is checked to answer (LOST, with why, when its server does not); with "
            "Slurm unreachable, jobs show their last known state and a warning goes to stderr."
        ),
    )
    _assignments(p, session=True)

    p = subs.add_parser(
        "share",
        parents=[sub_common],
        formatter_class=fmt,
        help="share a session with another user, or make a one-time token for it",
        description=(
            "Share one of your live sessions with another user of the site, who then names it\n"
            "SESSION=YOU/NAME. ro (the default): `status` and `access`, with every service mounted\n"
            "read-only whatever the WDF says. rw: also `run` (the jobs are the user's own, seeing\n"
            "the services with the WDF's modes) and `cancel` of their own runs. Only you may stop,\n"
            "share, unshare or cancel another user's run; `stop` waits for their jobs and accesses\n"
            "too (`--force` ends them). Sharing grants the session, not the files: what they read\n"
            "or write through a service is what the data's own permissions give them.\n"
            "With --token instead of USER=, prints a one-time token (the last word of the output)\n"
            "that whoever redeems it with `iosea-wf join TOKEN` gets the share by, until it\n"
            "expires (--expires, default 24h); the share ends then too.\n\n"
            "  iosea-wf share SESSION=s1 USER=bob\n"
            "  iosea-wf share SESSION=s1 USER=bob --mode rw --expires 7d\n"
            "  iosea-wf share SESSION=s1 --token --mode rw --expires 30m"
        ),
        epilog=EXIT_TABLE,
    )
    _assignments(p, session=True)
    p.add_argument("-u", "--user", metavar="USER", help="the user to share with (or USER=NAME)")
    p.add_argument("--mode", choices=["ro", "rw"], default="ro", help="what the share allows (default ro)")
    p.add_argument("--token", action="store_true", help="make a one-time token instead of naming a user")
    p.add_argument(
        "--expires",
        metavar="DURATION",
        help="how long the share (or token) lasts: 90s, 30m, 12h, 7d (token default 24h; at most 30d)",
    )

    p = subs.add_parser(
        "unshare",
        parents=[sub_common],
        formatter_class=fmt,
        help="end another user's share of a session",
        description=(
            "End a user's share of one of your sessions: their new requests are refused; what\n"
            "they already started shows in `status` and ends as Slurm ends it.\n\n"
            "  iosea-wf unshare SESSION=s1 USER=bob"
        ),
    )
    _assignments(p, session=True)
    p.add_argument("-u", "--user", metavar="USER", help="the user whose share ends (or USER=NAME)")

    p = subs.add_parser(
        "join",
        parents=[sub_common],
        formatter_class=fmt,
        help="redeem a one-time share token",
        description=(
            "Redeem a token made by `iosea-wf share --token` (once, before it expires): the session\n"
            "is then shared with you, as SESSION=OWNER/NAME.\n\n"
            "  iosea-wf join iwfs_..."
        ),
        epilog=EXIT_TABLE,
    )
    p.add_argument("token", metavar="TOKEN", help="the token")

    p = subs.add_parser(
        "site",
        formatter_class=fmt,
        help="sysadmin's tools for the site itself (site check)",
        description="Tools for the site's administrators.\n\n"
        "  iosea-wf site check [--json] [--timeout SECONDS]",
    )
    site_subs = p.add_subparsers(dest="site_command", metavar="SITE_COMMAND", parser_class=_Parser)
    p = site_subs.add_parser(
        "check",
        parents=[sub_common],
        formatter_class=fmt,
        help="check every host of the site inventory, in parallel",
        description=(
            "Check every host of the site inventory at once, outside Ansible, and print one line\n"
            "per host and check: reachable (hosts with ansible_connection: local are probed on\n"
            "this machine, others over SSH with the inventory's ansible_host, ansible_port,\n"
            "ansible_user, ansible_ssh_private_key_file, and host keys checked against\n"
            "iosea_ssh_known_hosts: an unknown or changed host key is refused); munge (the key\n"
            "identical everywhere, compared by a one-time HMAC and never shown; munged answers);\n"
            "clock (within 15 s of the site's median: any two hosts within 30 s, half the\n"
            "Workflow Manager's 60 s MUNGE credential TTL); slurmctld and slurmd (one sinfo:\n"
            "every compute node and datanode registered, not drained or down); ganesha on\n"
            "datanodes (a real NFSv4 listing and MOUNT call, or idle and ready); each tier on the\n"
            "controller and the datanodes (present, writable, enterable by users); the Workflow\n"
            "Manager (IOSEA_WF_URL or iosea_wm_url) answering. Run it as root.\n\n"
            "  iosea-wf site check\n"
            "  iosea-wf --site inventories/multihost site check --json --timeout 20"
        ),
        epilog="exit 0: every check passed; 13: at least one failed; 3: the site inventory is invalid",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long each host may take to connect and answer (default 10)",
    )

    p = subs.add_parser(
        "serve",
        parents=[sub_common],
        formatter_class=fmt,
        help="run the site's Workflow Manager service, for every user",
        description=(
            "Run the Workflow Manager as a long-lived service of the site: ONE session store for\n"
            "every user, the manager's rules for each request, and the only process that starts\n"
            "services and submits jobs. It answers an HTTP/JSON API (versioned under /v1/, OpenAPI\n"
            "document at /v1/openapi.json) on a Unix socket open to all users, and on TCP with\n"
            "--tcp for login nodes of other hosts.\n\n"
            "Who calls is proven, never claimed: every request carries a MUNGE credential of its\n"
            "caller whose payload is a digest of the request; a missing, replayed, expired or\n"
            "mismatched credential is refused (HTTP 401, the CLI exits 11). On the Unix socket the\n"
            "kernel's peer credentials must name the same user. A user sees and acts on their own\n"
            "sessions only. The CLI reads WDFs and batch scripts with the user's own rights and\n"
            "sends their text: the service never reads a user's files.\n\n"
            "The CLI uses the service wherever IOSEA_WF_URL is set or the site inventory names it\n"
            "(iosea_wm_url in group_vars/all, e.g. unix:///run/iosea-wf/wm.sock); it then ignores\n"
            "--state-dir and IOSEA_WF_HOME. Sessions live in the service's store and survive its\n"
            "restart. Stop it with SIGTERM or Ctrl-C.\n\n"
            "  iosea-wf serve --socket /run/iosea-wf/wm.sock --state-dir /var/lib/iosea-wf/wm\n"
            "  IOSEA_WF_URL=unix:///run/iosea-wf/wm.sock iosea-wf list"
        ),
        epilog=(
            "defaults: --socket is the path of the site's iosea_wm_url when it is unix://, else\n"
            "/run/iosea-wf/wm.sock; --state-dir is $IOSEA_WF_HOME, else /var/lib/iosea-wf/wm.\n"
            "exit 0 after SIGTERM; 3 when the site inventory is invalid; 2 for a bad --socket/--tcp"
        ),
    )
    p.add_argument("--socket", metavar="PATH", help="the Unix socket to listen on (mode 0666)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP too (MUNGE still proves who calls)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse argv; fold KEY=VALUE words into options and WDF variables."""
    parser = build_parser()
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if command and args.command != "access":
        raise UsageError(f"`{args.command}` takes no command after --")
    args.inner_command = command
    if not args.command:
        raise UsageError(f"a command is needed (see `{PROG} --help`)")
    variables: dict[str, str] = {}
    defines = list(getattr(args, "define", []) or [])
    for word in getattr(args, "words", []):
        m = ASSIGNMENT.match(word)
        if not m:
            raise UsageError(f"unexpected argument {word!r}: expected KEY=VALUE (e.g. SESSION=s1)")
        key, value = m.groups()
        if key == "USER" and hasattr(args, "user"):
            args.user = value
        elif key in KEYWORDS and hasattr(args, KEYWORDS[key]):
            setattr(args, KEYWORDS[key], value)
        elif key in KEYWORDS:
            raise UsageError(f"{key}= does not apply to `{args.command}`")
        elif args.command in ("validate", "start"):
            variables[key] = value
        else:
            raise UsageError(f"unexpected argument {word!r}: `{args.command}` takes no WDF variables")
    for d in defines:
        m = ASSIGNMENT.match(d)
        if not m:
            raise UsageError(f"-d expects NAME=value, got {d!r}")
        variables[m.group(1)] = m.group(2)
    args.variables = variables
    return args


# ---------------------------------------------------------------------------------------------
# printing


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (scripts, logs, `make demo`) is not cut to 80 columns.
    width = None if stream.isatty() else 240
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) if x is not None else "-" for x in r])
    _console().print(t)


def _print_session(s: dict[str, Any]) -> None:
    out = _console()
    out.print(f"session  {s['session']}  (workflow {s['workflow']}, owner {s['owner']})")
    out.print(f"state    {s['state']}   started {_when(s['started_at'])}")
    if s.get("shared_mode"):
        out.print(f"shared   with you, {s['shared_mode']} (SESSION={s['owner']}/{s['session']})")
    if s.get("shares"):
        out.print("shares   " + ", ".join(_share_text(x) for x in s["shares"]))
    if s.get("share_tokens"):
        out.print(f"tokens   {len(s['share_tokens'])} share token(s) not yet redeemed")
    if s.get("error"):
        out.print(f"error    {s['error']}")
    if s.get("steps"):
        rows = []
        for i in s["steps"]:
            rows.append(
                [
                    f"{i['name']}#{i['instance']}",
                    "step" if i.get("user") in (None, s["owner"]) else f"step (by {i['user']})",
                    i["state"],
                    i["job_id"],
                    i["exit_code"],
                    i.get("reason") or "",
                    "",
                ]
            )
            for m in i["datamovers"]:
                rows.append(
                    [
                        f"  {m['name']}",
                        f"{m['trigger']} {m['operation']}->{m['target']}",
                        m["state"],
                        m["job_id"],
                        m["exit_code"],
                        _progress_text(m.get("progress")) or m.get("reason") or "",
                        m.get("target_path"),
                    ]
                )
        _table("steps", ["step", "what", "state", "job", "exit", "detail", "target path"], rows)
    if s.get("accesses"):
        _table(
            "interactive access",
            ["job", "state", "partition", "since", "user"],
            [
                [a["job_id"], a["state"], a["partition"], _when(a["since"]), a.get("user")]
                for a in s["accesses"]
            ],
        )
    if s["services"]:
        _table(
            "ephemeral services",
            ["name", "type", "state", "datanode", "flavor", "allocation", "mountpoint", "url"],
            [
                [
                    v["name"],
                    v["type"],
                    v["state"],
                    v["datanode"],
                    v["flavor"],
                    v.get("allocation"),
                    v["mountpoint"],
                    v["url"],
                ]
                for v in s["services"]
            ],
        )
        for v in s["services"]:
            if v["state"] == "LOST":
                out.print(f"lost     {v['name']}: {v.get('error') or 'its server does not answer'}")


def _share_text(share: dict[str, Any]) -> str:
    until = f", until {_when(share['expires_at'])}" if share.get("expires_at") else ""
    return f"{share['user']} ({share['mode']}{until})"


def _progress_text(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    total = p.get("bytes_total") or 0
    pct = f"{100 * p.get('bytes_done', 0) / total:.0f}%" if total else "-"
    text = f"{pct} {p.get('files_done', 0)}/{p.get('files_total', 0)} files"
    if p.get("state") == "running" and p.get("eta_s") is not None:
        text += f", {p.get('throughput_bytes_per_s', 0) / 1e6:.0f} MB/s, eta {p['eta_s']:.0f}s"
    return text


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# commands


def _context(args: argparse.Namespace):
    from . import manager

    return manager.Context(site_dir=args.site, state_dir=args.state_dir, verbose=bool(args.verbose))


def _backend(args: argparse.Namespace) -> tuple[Any, Any]:
    """(context, operations): the site's Workflow Manager service where one is named, else in-process."""
    from .api.settings import configured_url

    url = None if args.command == "serve" else configured_url(args.site)
    if not url:
        from . import manager

        return _context(args), manager
    from .api import client

    if args.state_dir or os.environ.get("IOSEA_WF_HOME"):
        print(
            f"{PROG}: notice: --state-dir/IOSEA_WF_HOME ignored: "
            f"sessions are kept by the Workflow Manager at {url}",
            file=sys.stderr,
        )
    if args.site and os.environ.get("IOSEA_WF_URL", "").strip():
        print(f"{PROG}: notice: --site ignored: the Workflow Manager at {url} uses its own", file=sys.stderr)
    return client.ServiceContext(url, verbose=bool(args.verbose)), client


def cmd_validate(args, ctx, ops) -> int:
    wf = ops.validate(ctx, args.workflow or _need("WORKFLOW"), args.variables, session=args.session)
    summary = {
        "workflow": wf.name,
        "file": args.workflow,
        "site": str(ctx.site.path),
        "services": len(wf.services),
        "datamovers": len(wf.datamovers),
        "steps": len(wf.steps),
    }
    if args.json:
        _print_json({"valid": True, **summary})
    else:
        print(
            f"{args.workflow}: valid: workflow {wf.name}, {summary['services']} service(s), "
            f"{summary['datamovers']} data mover(s), {summary['steps']} step(s) on site {ctx.site.path.name}"
        )
    return EXIT_OK


def _need(key: str) -> str:
    raise UsageError(f"{key}= is mandatory")


def cmd_show(args, ctx, ops) -> int:
    rows = ops.show(ctx, args.what)
    if args.json:
        _print_json({args.what: rows})
        return EXIT_OK
    if not rows:
        print(f"the site offers no {args.what}")
        return EXIT_OK
    columns = [k for k in rows[0] if k != "default"]
    _table(
        f"{args.what} of site {ctx.site.path}",
        columns + ["default"] if "default" in rows[0] else columns,
        [
            [", ".join(map(str, r[c])) if isinstance(r[c], list) else r[c] for c in columns]
            + (["yes" if r["default"] else ""] if "default" in r else [])
            for r in rows
        ],
    )
    return EXIT_OK


def cmd_start(args, ctx, ops) -> int:
    from .durations import parse_duration

    wait = (
        parse_duration(args.wait_resources, "--wait-resources") if args.wait_resources is not None else None
    )
    record = ops.start(
        ctx, args.workflow, args.session, args.variables, progress=_progress, wait_resources=wait
    )
    summary = ops.session_summary(record)
    if args.json:
        _print_json(summary)
    else:
        _print_session(summary)
    return EXIT_OK


def cmd_stop(args, ctx, ops) -> int:
    record = ops.stop(ctx, args.session, force=args.force, progress=_progress)
    if args.json:
        _print_json(ops.session_summary(record))
    else:
        print(f"session {record['name']}: {record['state']}")
    return EXIT_OK


def cmd_run(args, ctx, ops) -> int:
    view = ops.run(ctx, args.session, args.step)
    ids = [f"step {view['job_id']}"] + [f"{m['name']} {m['job_id']}" for m in view["datamovers"]]
    if not args.wait:
        if args.json:
            _print_json(view)
        else:
            print(f"step {view['name']} instance {view['instance']} submitted: jobs {', '.join(ids)}")
        return EXIT_OK
    _progress(f"step {view['name']} instance {view['instance']} submitted: jobs {', '.join(ids)}")
    seen: dict[str, str] = {}

    def on_update(v: dict[str, Any]) -> None:
        reachable = v.get("slurm_reachable", True)
        if seen.get("slurm") != str(reachable):
            if not reachable:
                _progress(
                    f"warning: {v.get('slurm_error') or 'Slurm is unreachable'}: still waiting; the "
                    "states shown are the last known ones (Ctrl-C stops waiting, the chain stays in Slurm)"
                )
            elif "slurm" in seen:
                _progress("Slurm answers again")
            seen["slurm"] = str(reachable)
        for key, state, extra in [(f"step {v['name']}", v["state"], "")] + [
            (f"data mover {m['name']}", m["state"], _progress_text(m.get("progress")))
            for m in v["datamovers"]
        ]:
            line = f"{key}: {state}" + (f" ({extra})" if extra else "")
            if seen.get(key) != line:
                seen[key] = line
                _progress(line)

    try:
        final = ops.follow(ctx, args.session, view["name"], view["instance"], on_update)
    except KeyboardInterrupt as exc:
        from .errors import Interrupted

        stopped = exc if isinstance(exc, Interrupted) else Interrupted()
        stopped.note = (
            f"stopped following step {view['name']} instance {view['instance']}: its chain keeps "
            f"running in Slurm; follow it with `{PROG} status SESSION={args.session}`"
        )
        raise stopped from None
    if args.json:
        _print_json(final)
    else:
        print(f"step {final['name']} instance {final['instance']}: {final['state']}")
    return EXIT_OK


def cmd_access(args, ctx, ops) -> int:
    return ops.access(
        ctx,
        args.session,
        args.inner_command,
        nodes=args.nodes,
        cores=args.cores,
        time_limit=args.time,
        partition=args.partition,
        immediate=args.immediate,
        progress=_progress,
    )


def cmd_cancel(args, ctx, ops) -> int:
    ids = ops.cancel(ctx, args.session, args.step, args.instance)
    if args.json:
        _print_json({"cancelled": ids})
    elif ids:
        print(f"cancelled job(s) {' '.join(ids)}")
    else:
        print("nothing to cancel: every job of it has already ended")
    return EXIT_OK


def cmd_list(args, ctx, ops) -> int:
    rows = ops.list_sessions(ctx, include_ended=args.all)
    if args.json:
        _print_json({"sessions": rows})
    elif not rows:
        print("no session" if args.all else "no live session (use --all to see stopped and failed ones)")
    else:
        _table(
            None,
            ["session", "owner", "shared", "workflow", "state", "started", "services"],
            [
                [
                    f"{r['owner']}/{r['session']}" if r.get("shared_mode") else r["session"],
                    r["owner"],
                    r.get("shared_mode"),
                    r["workflow"],
                    r["state"],
                    _when(r["started_at"]),
                    ", ".join(s["name"] for s in r["services"]) or "-",
                ]
                for r in rows
            ],
        )
    return EXIT_OK


def cmd_status(args, ctx, ops) -> int:
    summary = ops.status(ctx, args.session)
    for warning in summary.get("warnings", []):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if args.json:
        _print_json(summary)
    else:
        _print_session(summary)
    return EXIT_OK


def cmd_share(args, ctx, ops) -> int:
    from .sharing import parse_duration

    if args.token and args.user:
        raise UsageError("share: give USER= or --token, not both")
    if not args.token and not args.user:
        raise UsageError("share: USER= is mandatory (or --token for a one-time token)")
    expires_s = parse_duration(args.expires) if args.expires is not None else None
    if args.token:
        made = ops.share_token(ctx, args.session, args.mode, expires_s)
        if args.json:
            _print_json(made)
        else:
            # The token is the last word: `... | awk '{print $NF}'` gets it.
            print(
                f"session {made['session']}: one-time {made['mode']} share token, to redeem with "
                f"`{PROG} join TOKEN` until {_when(made['expires_at'])}: {made['token']}"
            )
        return EXIT_OK
    shared = ops.share(ctx, args.session, args.user, args.mode, expires_s)
    if args.json:
        _print_json(shared)
    else:
        until = f" until {_when(shared['expires_at'])}" if shared.get("expires_at") else ""
        print(
            f"session {shared['session']}: shared with {shared['user']} ({shared['mode']}){until}; "
            f"they name it SESSION={shared['owner']}/{shared['session']}"
        )
    return EXIT_OK


def cmd_unshare(args, ctx, ops) -> int:
    done = ops.unshare(ctx, args.session, args.user)
    if args.json:
        _print_json(done)
    elif done["was_shared"]:
        print(f"session {done['session']}: no longer shared with {done['user']}")
    else:
        print(f"session {done['session']} was not shared with {done['user']}: nothing to do")
    return EXIT_OK


def cmd_join(args, ctx, ops) -> int:
    joined = ops.join(ctx, args.token)
    if args.json:
        _print_json(joined)
    else:
        print(
            f"session {joined['owner']}/{joined['session']} is shared with you ({joined['mode']}) until "
            f"{_when(joined['expires_at'])}: name it SESSION={joined['owner']}/{joined['session']}"
        )
    return EXIT_OK


def cmd_site(args) -> int:
    """``site check``: probe every host, print one line per host and check and a summary."""
    from .errors import EXIT_UNHEALTHY
    from .site_check import check_site

    if args.site_command != "check":
        raise UsageError(f"`{PROG} site` needs a command: check (see `{PROG} site --help`)")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    report = check_site(args.site, timeout=args.timeout)
    if args.json:
        _print_json(report.to_dict())
    else:
        width = max([len(c.host) for c in report.checks] + [4])
        kind = max([len(c.check) for c in report.checks] + [5])
        print(f"site {report.site}: {len(report.hosts)} hosts; {report.clock_rule()}")
        print(f"{'HOST':<{width}}  {'CHECK':<{kind}}  {'RESULT':<6}  DETAIL")
        for c in report.checks:
            print(f"{c.host:<{width}}  {c.check:<{kind}}  {c.status:<6}  {c.detail}")
        print(f"summary: {report.summary()}")
    return EXIT_OK if report.ok else EXIT_UNHEALTHY


def cmd_serve(args, ctx, ops) -> int:
    from .api.server import serve
    from .api.settings import DEFAULT_STATE_DIR, default_socket

    state_dir = args.state_dir or os.environ.get("IOSEA_WF_HOME") or DEFAULT_STATE_DIR
    socket_path = Path(args.socket) if args.socket else default_socket(args.site)
    return serve(args.site, state_dir, socket_path, args.tcp, verbose=bool(args.verbose))


COMMANDS = {
    "validate": cmd_validate,
    "show": cmd_show,
    "start": cmd_start,
    "stop": cmd_stop,
    "run": cmd_run,
    "access": cmd_access,
    "cancel": cmd_cancel,
    "list": cmd_list,
    "status": cmd_status,
    "share": cmd_share,
    "unshare": cmd_unshare,
    "join": cmd_join,
    "serve": cmd_serve,
}


def _wants_json(argv: list[str], args: argparse.Namespace | None) -> bool:
    """True when --json was asked, even on a command line that did not parse (an access's command aside)."""
    if args is not None:
        return bool(getattr(args, "json", False))
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def _interruptible() -> dict:
    """SIGINT and SIGTERM raise Interrupted in the main thread, so every command cleans up and says so.

    Returns the handlers it replaced (main restores them: tests call main in their own process).
    """
    import signal
    import threading

    from .errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, interrupt)
    if previous:
        previous["unraisablehook"] = sys.unraisablehook
        sys.unraisablehook = _interrupt_again_if_lost
    return previous


def _interrupt_again_if_lost(unraisable) -> None:
    """A signal that came while a finalizer ran (a ``__del__`` of Ansible's, say) is not lost.

    Python ignores an exception raised in a finalizer: it prints "Exception ignored" with a
    traceback, and the command would go on as if Ctrl-C had never been pressed. The signal is sent
    again instead, a few milliseconds later, when the finalizer has returned.
    """
    import os
    import signal
    import threading

    from .errors import Interrupted

    exc = unraisable.exc_value
    if not isinstance(exc, Interrupted):
        sys.__unraisablehook__(unraisable)
        return
    ours = signal.getsignal(exc.signum)

    def send_again():
        if signal.getsignal(exc.signum) is ours:  # not once the command is over
            os.kill(os.getpid(), exc.signum)

    again = threading.Timer(0.005, send_again)
    again.daemon = True
    again.start()


def _restore(previous: dict) -> None:
    import signal

    hook = previous.pop("unraisablehook", None)
    if hook is not None:
        sys.unraisablehook = hook
    while previous:
        sig, handler = previous.popitem()
        signal.signal(sig, handler)


def main(argv: list[str] | None = None, *, restore_signals: bool | None = None) -> int:
    """Run the CLI; return the exit code (the console script exits with it).

    Without ``argv`` (the console script) SIGINT and SIGTERM are ignored once the command is
    over and has said so: one arriving at exit never becomes a traceback. Given ``argv`` (tests
    calling it in their process), the previous handlers are restored instead.
    """
    if restore_signals is None:
        restore_signals = argv is not None
    argv = sys.argv[1:] if argv is None else argv
    args = None
    previous = _interruptible()
    try:
        args = parse(argv)
        if args.command == "serve":  # the server handles its own signals (it exits 0 on SIGTERM)
            _restore(previous)
        if args.command == "site":  # the sysadmin's tools run here, never through the service
            return cmd_site(args)
        return COMMANDS[args.command](args, *_backend(args))
    except IoseaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if _wants_json(argv, args):
            # A script reading stdout gets the error too, as the service reports it.
            _print_json(error_body(exc))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        what = "terminated" if signum == 15 else "interrupted"
        note = getattr(exc, "note", "") or "nothing was left half done"
        print(f"{PROG}: {what}: {note}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        if restore_signals:
            _restore(previous)
        else:
            import signal

            previous.pop("unraisablehook", None)
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)


def console_main() -> None:
    """Entry point of the console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
