"""The Workflow Manager service without Slurm or NFS: `iosea-wf serve` on a temporary socket.

The CLI talks to it (IOSEA_WF_URL=unix://...) and must print and exit exactly as in-process;
requests without valid proof of their caller are refused. Needs munged (the site's, or skipped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from iosea_wf import cli, identity
from iosea_wf.api import client, settings
from iosea_wf.errors import (
    EXIT_UNAUTHENTICATED,
    EXIT_UNREACHABLE,
    SessionNotFound,
    SiteError,
    UsageError,
    WDFError,
)
from tests.api_service import need_munge, raw_request, running_service

NO_SERVICE_WDF = """\
workflow:
  name: wf_api
steps:
  - name: step1
    location: cpu_module
    command: "sbatch job.sh"
"""
BAD_WDF = """\
workflow:
  name: wf_bad
services:
  - name: es
    type: NFS
    attributes:
      namespace: "{{ NS }}"
      mountpoint: /mnt/x
      flavor: nonexistent
steps:
  - name: s
    location: nowhere
    command: "sbatch job.sh"
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory, inprocess_site):
    """A running service: (socket path, state dir, TCP port). The socket's folder is open to all."""
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-api-", dir="/tmp"))
    folder.chmod(0o755)
    sock, state = folder / "wm.sock", tmp_path_factory.mktemp("service-state")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        # The same site as the in-process side, so that both print the same site path.
        with running_service(sock, state, "--site", str(inprocess_site), "--tcp", f"127.0.0.1:{port}"):
            yield sock, state, port
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def both(service, tmp_path, monkeypatch, capsys, inprocess_site):
    """Run the CLI in-process twice: through the service and alone. both(*argv) -> (svc, local)."""
    sock, *_ = service
    local_state = tmp_path / "local-state"
    monkeypatch.setenv("IOSEA_WF_SITE", str(inprocess_site))

    def call(*argv: str):
        results = []
        for url in (f"unix://{sock}", None):
            if url:
                monkeypatch.setenv("IOSEA_WF_URL", url)
                monkeypatch.delenv("IOSEA_WF_HOME", raising=False)
            else:
                monkeypatch.delenv("IOSEA_WF_URL", raising=False)
                monkeypatch.setenv("IOSEA_WF_HOME", str(local_state))
            code = cli.main([str(a) for a in argv])
            out = capsys.readouterr()
            results.append((code, _mask(out.out), _mask(out.err)))
        return results

    return call


def _mask(text: str) -> str:
    """Output with what differs between two runs a moment apart (times, session ids) blanked."""
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<time>", text)
    text = re.sub(r'"id": "[0-9a-f]{32}"', '"id": <id>', text)
    return re.sub(r'"(started_at|ended_at)": [0-9.]+', r'"\1": <t>', text)


def test_validate_show_list_status_print_and_exit_as_in_process(both, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(NO_SERVICE_WDF)
    bad.write_text(BAD_WDF)
    (tmp_path / "latin1.yaml").write_bytes(b"workflow:\n  name: caf\xe9\n")
    cases = [
        ["validate", f"WORKFLOW={good}"],
        ["validate", f"WORKFLOW={good}", "--json"],
        ["validate", f"WORKFLOW={bad}", "NS=/tmp"],
        ["validate", f"WORKFLOW={bad}"],
        ["validate", f"WORKFLOW={tmp_path / 'missing.yaml'}"],
        ["validate", f"WORKFLOW={tmp_path / 'latin1.yaml'}"],
        ["validate", f"WORKFLOW={good}", "USER=someone"],
        ["validate"],
        ["show", "flavors"],
        ["show", "tiers", "--json"],
        ["show", "locations"],
        ["list"],
        ["list", "--all", "--json"],
        ["status", "SESSION=nope"],
        ["status", "SESSION=bad/na/me"],
        ["status", "SESSION=someone/nope"],
        ["share", "SESSION=nope", "USER=nobody"],
        ["share", "SESSION=nope", "--token", "--expires", "1y"],
        ["unshare", "SESSION=nope", "USER=nobody"],
        ["join", "iwfs_" + "x" * 43],
        ["join", "nope"],
        ["status"],
        ["stop", "SESSION=nope"],
        ["cancel", "SESSION=nope"],
        ["run", "SESSION=nope", "STEP=step1"],
        ["run", "SESSION=nope"],
        ["start", f"WORKFLOW={good}"],
        ["start", "SESSION=x"],
        ["start", f"WORKFLOW={bad}", "SESSION=x"],
    ]
    seen_codes = set()
    for argv in cases:
        svc, local = both(*argv)
        assert svc == local, argv
        assert "Traceback" not in svc[2]
        seen_codes.add(svc[0])
    assert seen_codes == {0, 2, 4, 12}


def test_with_json_an_error_is_a_json_object_on_stdout_too_through_the_service_as_in_process(both, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_WDF)
    cases = [
        (["validate", f"WORKFLOW={bad}", "--json"], 2),
        (["validate", "--json"], 2),
        (["show", "nothing", "--json"], 2),
        (["start", "SESSION=x", "--json"], 2),
        (["stop", "SESSION=nope", "--json"], 4),
        (["run", "SESSION=nope", "STEP=step1", "--json"], 4),
        (["run", "SESSION=nope", "STEP=step1", "--wait", "--json"], 4),
        (["access", "SESSION=nope", "--json", "--", "true"], 4),
        (["cancel", "SESSION=nope", "--json"], 4),
        (["list", "--json", "--bogus"], 2),
        (["status", "SESSION=nope", "--json"], 4),
        (["--json", "status", "SESSION=bad/na/me"], 2),
        (["serve", "--json", "--bogus"], 2),
        (["--json"], 2),
    ]
    for argv, code in cases:
        svc, local = both(*argv)
        assert svc == local, argv
        assert svc[0] == code, (argv, svc)
        error = json.loads(svc[1])["error"]
        assert error["exit_code"] == code and error["message"], (argv, error)
        assert svc[2].startswith("iosea-wf: error: " + error["message"]), (argv, svc[2])
    # Without --json, stdout stays empty; an access's own command may have a --json of its own.
    for argv in (["status", "SESSION=nope"], ["access", "SESSION=nope", "--", "x", "--json"]):
        svc, local = both(*argv)
        assert svc == local and svc[0] == 4 and svc[1] == "", (argv, svc)
    # A WDF's problems come with the error, one per detail.
    svc, _ = both("validate", f"WORKFLOW={bad}", "NS=/tmp", "--json")
    assert len(json.loads(svc[1])["error"]["details"]) >= 2


def test_a_session_started_listed_and_stopped_through_the_service_reads_as_in_process(
    both, tmp_path, monkeypatch
):
    wdf = tmp_path / "good.yaml"
    wdf.write_text(NO_SERVICE_WDF)
    monkeypatch.chdir(tmp_path)
    name = f"api-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    for argv in (
        ["start", f"WORKFLOW={wdf}", f"SESSION={name}"],
        ["start", f"WORKFLOW={wdf}", f"SESSION={name}"],  # the name is taken: exit 5
        ["list"],
        ["status", f"SESSION={name}"],
        ["status", f"SESSION={name}", "--json"],
        ["run", f"SESSION={name}", "STEP=nostep"],
        ["run", f"SESSION={name}", "STEP=step1"],  # job.sh is missing: exit 2, nothing submitted
        "write a job.sh with a reserved #SBATCH option",
        ["run", f"SESSION={name}", "STEP=step1"],  # refused naming this job.sh: exit 2
        ["stop", f"SESSION={name}", "--json"],
        ["stop", f"SESSION={name}"],
        ["list", "--all"],
    ):
        if isinstance(argv, str):
            (tmp_path / "job.sh").write_text("#!/bin/sh\n#SBATCH --wait\ntrue\n")
            continue
        svc, local = both(*argv)
        assert svc == local, argv
        if argv[:1] == ["run"] and argv[-1] == "STEP=step1":
            assert svc[0] == 2 and str(tmp_path / "job.sh") in svc[2], svc
    assert svc[0] == 0 and name in svc[1]


def test_state_dir_is_ignored_with_a_notice_when_a_service_is_named(service, monkeypatch, capsys, tmp_path):
    sock, *_ = service
    monkeypatch.setenv("IOSEA_WF_URL", f"unix://{sock}")
    assert cli.main(["list", "--state-dir", str(tmp_path / "ignored")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--state-dir/IOSEA_WF_HOME ignored" in err
    assert not (tmp_path / "ignored").exists()
    assert cli.main(["show", "tiers", "--site", str(tmp_path)]) == 0
    assert capsys.readouterr().err.startswith("iosea-wf: notice: --site ignored")


def test_an_unreachable_service_exits_10_without_traceback(monkeypatch, capsys, tmp_path):
    for url in (f"unix://{tmp_path}/none.sock", "http://127.0.0.1:9"):
        monkeypatch.setenv("IOSEA_WF_URL", url)
        assert cli.main(["list"]) == EXIT_UNREACHABLE
        err = capsys.readouterr().err
        assert "cannot be reached" in err and "Traceback" not in err
    monkeypatch.setenv("IOSEA_WF_URL", "ftp://somewhere")
    assert cli.main(["list"]) == 2


def test_munged_down_is_exit_10_when_the_service_is_not_there_either_and_11_when_it_is(
    service, monkeypatch, capsys, tmp_path
):
    """Issue 14: with munged down as well, an absent service said "cannot get a MUNGE credential"
    (exit 11): the client connects first, so the service's absence is told (exit 10)."""
    sock, *_ = service
    down = tmp_path / "bin"
    down.mkdir()
    (down / "munge").write_text(
        "#!/bin/sh\n"
        "echo 'munge: Error: Failed to connect to \"/run/munge/munge.socket.2\": Connection refused' >&2\n"
        "exit 6\n"
    )
    (down / "munge").chmod(0o755)
    monkeypatch.setenv("PATH", f"{down}:{os.environ['PATH']}")
    monkeypatch.setenv("IOSEA_WF_URL", f"unix://{tmp_path}/none.sock")
    assert cli.main(["list"]) == EXIT_UNREACHABLE
    assert "cannot be reached" in capsys.readouterr().err
    monkeypatch.setenv("IOSEA_WF_URL", f"unix://{sock}")
    assert cli.main(["list"]) == 11
    assert "cannot get a MUNGE credential to prove who you are: munge: Error" in capsys.readouterr().err


def _signed(path: str, body: bytes = b"", method: str = "GET", query: bytes = b"") -> str:
    return identity.make_credential(identity.request_digest(method, path, query, body))


def test_no_credential_is_refused_with_401(service):
    sock, *_ = service
    status, body = raw_request(sock, "GET", "/v1/sessions")
    assert status == 401
    assert body["error"]["exit_code"] == EXIT_UNAUTHENTICATED
    assert "no MUNGE credential" in body["error"]["message"]
    junk = {identity.CREDENTIAL_HEADER: "MUNGE:junk"}
    status, body = raw_request(sock, "GET", "/v1/sessions", headers=junk)
    assert status == 401 and "not valid" in body["error"]["message"]


def test_a_replayed_credential_is_refused(service):
    sock, *_ = service
    headers = {identity.CREDENTIAL_HEADER: _signed("/v1/sessions")}
    assert raw_request(sock, "GET", "/v1/sessions", headers=headers)[0] == 200
    status, body = raw_request(sock, "GET", "/v1/sessions", headers=headers)
    assert status == 401 and "replayed" in body["error"]["message"]


def test_an_expired_credential_is_refused(service):
    sock, *_ = service
    cred = identity.make_credential(identity.request_digest("GET", "/v1/sessions", b"", b""), ttl=1)
    time.sleep(2.1)
    status, body = raw_request(sock, "GET", "/v1/sessions", headers={identity.CREDENTIAL_HEADER: cred})
    assert status == 401 and "expired" in body["error"]["message"]


def test_a_credential_made_for_another_request_is_refused(service):
    sock, *_ = service
    # Made for a harmless request, sent with another (another path, then another body).
    headers = {identity.CREDENTIAL_HEADER: _signed("/v1/sessions")}
    status, body = raw_request(sock, "GET", "/v1/sessions/victim", headers=headers)
    assert status == 401 and "another request" in body["error"]["message"]
    stop = json.dumps({"force": False}).encode()
    headers = {identity.CREDENTIAL_HEADER: _signed("/v1/sessions/s/stop", stop, "POST")}
    status, body = raw_request(
        sock, "POST", "/v1/sessions/s/stop", json.dumps({"force": True}).encode(), headers
    )
    assert status == 401 and "another request" in body["error"]["message"]


def _as_nobody(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *argv], input=stdin, capture_output=True, text=True, timeout=30
    )


def test_a_name_in_the_request_is_ignored_the_credential_says_who_calls(service):
    sock, *_ = service
    if os.geteuid() != 0 or not shutil.which("curl"):
        pytest.skip("needs root (to act as nobody) and curl")
    # nobody makes a credential for a request that claims, in every way a request can, to be root.
    query = b"user=root"
    payload = identity.request_digest("GET", "/v1/whoami", query, b"")
    cred = _as_nobody("munge", stdin=payload).stdout.strip()
    done = _as_nobody(
        "curl", "-s", "--unix-socket", str(sock), "-H", f"{identity.CREDENTIAL_HEADER}: {cred}",
        "-H", "X-Iosea-User: root", "-H", "X-Remote-User: root", "http://wm/v1/whoami?user=root",
    )  # fmt: skip
    assert json.loads(done.stdout) == {"user": "nobody"}


def test_a_credential_of_another_user_sent_by_root_is_refused_by_peer_credentials(service):
    sock, *_ = service
    if os.geteuid() != 0:
        pytest.skip("needs root (to act as nobody)")
    cred = _as_nobody("munge", stdin=identity.request_digest("GET", "/v1/whoami", b"", b"")).stdout.strip()
    status, body = raw_request(sock, "GET", "/v1/whoami", headers={identity.CREDENTIAL_HEADER: cred})
    assert status == 401
    assert "of nobody but was sent by root" in body["error"]["message"]


def test_the_cli_says_unauthenticated_with_exit_11(service, monkeypatch, capsys):
    sock, *_ = service
    monkeypatch.setenv("IOSEA_WF_URL", f"unix://{sock}")
    # A munge that cannot reach munged: the CLI has no proof to send.
    monkeypatch.setattr(identity, "make_credential", lambda payload, ttl=60: "MUNGE:not-a-credential")
    assert cli.main(["list"]) == EXIT_UNAUTHENTICATED
    err = capsys.readouterr().err
    assert "MUNGE credential is not valid" in err and "Traceback" not in err


def test_openapi_document_lists_one_route_per_command(service):
    sock, *_ = service
    status, doc = raw_request(sock, "GET", "/v1/openapi.json")
    assert status == 200
    paths = set(doc["paths"])
    assert {
        "/v1/sessions",
        "/v1/sessions/{name}",
        "/v1/validate",
        "/v1/site/{what}",
        "/v1/sessions/{name}/stop",
        "/v1/sessions/{name}/steps/{step}/runs",
        "/v1/sessions/{name}/cancel",
        "/v1/sessions/{name}/accesses/{token}",
    } <= paths


def test_sessions_survive_a_restart_of_the_service(tmp_path, monkeypatch, capsys):
    need_munge()
    sock, state = tmp_path / "wm.sock", tmp_path / "state"
    wdf = tmp_path / "wdf.yaml"
    wdf.write_text(NO_SERVICE_WDF)
    monkeypatch.setenv("IOSEA_WF_URL", f"unix://{sock}")
    with running_service(sock, state):
        assert cli.main(["start", f"WORKFLOW={wdf}", "SESSION=kept"]) == 0
    capsys.readouterr()
    with running_service(sock, state):
        assert cli.main(["status", "SESSION=kept", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "ACTIVE"
        assert cli.main(["stop", "SESSION=kept"]) == 0


# ---------------------------------------------------------------------------------------------
# pieces that need no service


def test_the_site_names_its_workflow_manager_literally(tmp_path, monkeypatch):
    monkeypatch.delenv("IOSEA_WF_URL", raising=False)
    site = tmp_path / "site"
    (site / "group_vars" / "all").mkdir(parents=True)
    assert settings.configured_url(site) is None
    (site / "group_vars" / "all" / "wm.yml").write_text("iosea_wm_url: unix:///run/x/wm.sock\n")
    assert settings.configured_url(site) == "unix:///run/x/wm.sock"
    assert settings.default_socket(site) == Path("/run/x/wm.sock")
    monkeypatch.setenv("IOSEA_WF_URL", "http://127.0.0.1:8000")
    assert settings.configured_url(site) == "http://127.0.0.1:8000"
    monkeypatch.delenv("IOSEA_WF_URL")
    (site / "group_vars" / "all" / "wm.yml").write_text("iosea_wm_url: '{{ somewhere }}'\n")
    with pytest.raises(Exception, match="must be a literal URL"):
        settings.configured_url(site)


def test_errors_come_back_as_the_same_class_and_exit_code():
    for exc in (SessionNotFound("no such"), UsageError("bad", details=["a"]), WDFError("wdf", ["p1", "p2"])):
        from iosea_wf.api.app import error_body

        back = client.rebuild_error(error_body(exc)["error"])
        assert type(back) is type(exc)
        assert (back.exit_code, str(back)) == (exc.exit_code, str(exc))
    odd = client.rebuild_error({"type": "Gone", "exit_code": 9, "message": "m", "details": []})
    assert odd.exit_code == 9 and str(odd) == "m"


def test_run_without_the_step_script_is_refused_the_service_never_reads_it(service, monkeypatch, tmp_path):
    sock, *_ = service
    wdf = tmp_path / "wdf.yaml"
    wdf.write_text(NO_SERVICE_WDF)
    monkeypatch.setenv("IOSEA_WF_URL", f"unix://{sock}")
    name = f"noscript-{os.getpid()}"
    assert cli.main(["start", f"WORKFLOW={wdf}", f"SESSION={name}"]) == 0
    (tmp_path / "job.sh").write_text("#!/bin/sh\ntrue\n")
    path = f"/v1/sessions/{name}/steps/step1/runs"
    for script in (None, {"name": "other.sh", "content_b64": ""}):
        body = json.dumps({"cwd": str(tmp_path), "script": script}).encode()
        headers = {identity.CREDENTIAL_HEADER: _signed(path, body, "POST")}
        headers["Content-Type"] = "application/json"
        status, answer = raw_request(sock, "POST", path, body, headers)
        assert status == 400, answer
        assert answer["error"]["message"] == "the step's batch script job.sh was not sent with the request"
    assert cli.main(["stop", f"SESSION={name}"]) == 0


def test_tcp_serves_the_same_api_with_munge_as_the_only_proof(service, monkeypatch, capsys):
    sock, _, port = service
    monkeypatch.setenv("IOSEA_WF_URL", f"http://127.0.0.1:{port}")
    assert cli.main(["show", "flavors", "--json"]) == 0
    assert "medium" in json.loads(capsys.readouterr().out)["flavors"][1]["name"]
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/v1/whoami")
    assert r.status_code == 401 and r.json()["error"]["exit_code"] == EXIT_UNAUTHENTICATED
    cred = _signed("/v1/whoami")
    r = httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers={identity.CREDENTIAL_HEADER: cred})
    assert r.json() == {"user": identity.current_user()}


def test_fifty_stops_waiting_at_once_do_not_keep_others_waiting(service, tmp_path, monkeypatch):
    """Waiting commands hold no thread of the server's pool (40): `list` still answers at once."""
    sock, *_ = service
    wdf = tmp_path / "wdf.yaml"
    wdf.write_text(NO_SERVICE_WDF)
    url = f"unix://{sock}"
    ctx = client.ServiceContext(url)
    names = [f"wait-{os.getpid()}-{i}" for i in range(50)]
    holder = subprocess.Popen(["sleep", "120"])  # an interactive access whose salloc still runs
    try:
        for name in names:
            client.start(ctx, str(wdf), name, {})
            entry = {"token": f"t{name}", "since": time.time(), "pid": holder.pid}
            ctx.call("PUT", f"/v1/sessions/{name}/accesses/t{name}", body=entry)
        said: dict[str, list[str]] = {n: [] for n in names}
        threads = [
            threading.Thread(
                target=lambda n=n: client.stop(client.ServiceContext(url), n, progress=said[n].append)
            )
            for n in names
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while not all(said.values()) and time.time() < deadline:
            time.sleep(0.1)
        assert all("waiting for job(s) access" in " ".join(v) for v in said.values())
        began = time.monotonic()
        assert len(client.list_sessions(ctx)) >= len(names)
        assert time.monotonic() - began < 2.0
    finally:
        holder.kill()
        holder.wait()
    for t in threads:
        t.join(60)
    assert {s["session"] for s in client.list_sessions(ctx)}.isdisjoint(names)


def test_an_access_recorded_over_tcp_keeps_no_pid_that_stop_would_wait_on(service, tmp_path):
    sock, state, port = service
    wdf = tmp_path / "wdf.yaml"
    wdf.write_text(NO_SERVICE_WDF)
    name = f"tcp-access-{os.getpid()}"
    local, remote = client.ServiceContext(f"unix://{sock}"), client.ServiceContext(f"http://127.0.0.1:{port}")
    client.start(local, str(wdf), name, {})
    for ctx, token in ((local, "viaunix"), (remote, "viatcp")):
        ctx.call("PUT", f"/v1/sessions/{name}/accesses/{token}", body={"token": token, "pid": os.getpid()})
    record = next(
        s for s in json.loads((state / "iosea-wf.json").read_text())["sessions"].values() if s["name"] == name
    )
    pids = {a["token"]: a["pid"] for a in record["accesses"]}
    assert pids == {"viaunix": os.getpid(), "viatcp": None}
    for ctx, token in ((local, "viaunix"), (remote, "viatcp")):
        ended = {"token": token, "ended_at": time.time()}
        ctx.call("PUT", f"/v1/sessions/{name}/accesses/{token}", body=ended)
    record = next(
        s for s in json.loads((state / "iosea-wf.json").read_text())["sessions"].values() if s["name"] == name
    )
    assert {a["token"]: a["pid"] for a in record["accesses"]} == pids  # a partial update keeps the rest
    assert client.stop(local, name)["state"] == "STOPPED"


def test_a_request_body_larger_than_the_limit_is_refused_before_it_is_read(service):
    from iosea_wf.api.limits import MAX_BODY_BYTES

    sock, *_ = service
    big = b"x" * (MAX_BODY_BYTES + 1)
    status, body = raw_request(
        sock, "POST", "/v1/validate", body=big, headers={"Content-Type": "application/json"}
    )
    assert status == 413 and body["error"]["exit_code"] == 2 and "larger than" in body["error"]["message"]

    import httpx

    def chunks():  # no Content-Length: the body is streamed, counted as it comes
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"y" * 65536

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://wm") as c:
        r = c.post("/v1/validate", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["exit_code"] == 2
    # A request within the limit still reaches the route (and, with no credential, is refused 401).
    assert raw_request(sock, "POST", "/v1/validate", body=b"{}")[0] == 401


# Modules the read-only commands must never import: Ansible (the service imported it once, at
# start), and through the service neither the store, the site model, YAML nor httpx (each command
# is a new process: every import is paid again, every time).
_HEAVY_EVERYWHERE = {"ansible", "ansible_runner"}
_HEAVY_THROUGH_SERVICE = _HEAVY_EVERYWHERE | {"tinydb", "voluptuous", "yaml", "jinja2", "httpx"}
_IMPORTED = """\
import json, sys
from iosea_wf import cli
code = cli.main(sys.argv[1:])
print(json.dumps([code, sorted({m.split(".")[0] for m in sys.modules})]), file=sys.stderr)
"""


BIN = Path(sys.executable).parent


def _imported(env: dict[str, str], cwd: Path, *argv: str) -> tuple[int, set[str]]:
    done = subprocess.run(
        [str(BIN / "python"), "-c", _IMPORTED, *argv], env=env, cwd=cwd, capture_output=True, text=True
    )
    code, modules = json.loads(done.stderr.strip().splitlines()[-1])
    return code, set(modules)


def test_status_and_list_import_no_ansible_and_through_the_service_nothing_heavy(
    service, tmp_path, inprocess_site
):
    sock, *_ = service
    (tmp_path / "wf.yaml").write_text(NO_SERVICE_WDF)
    base = {
        k: v for k, v in os.environ.items() if k not in ("IOSEA_WF_URL", "IOSEA_WF_HOME", "IOSEA_WF_SITE")
    }
    through = {**base, "IOSEA_WF_URL": f"unix://{sock}"}
    alone = {**base, "IOSEA_WF_HOME": str(tmp_path / "alone"), "IOSEA_WF_SITE": str(inprocess_site)}
    for env in (through, alone):
        started = subprocess.run(
            [str(BIN / "iosea-wf"), "start", "WORKFLOW=wf.yaml", "SESSION=light"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stderr
    for argv in (["status", "SESSION=light"], ["status", "SESSION=light", "--json"], ["list", "--all"]):
        code, modules = _imported(through, tmp_path, *argv)
        assert code == 0 and not modules & _HEAVY_THROUGH_SERVICE, (argv, modules & _HEAVY_THROUGH_SERVICE)
        code, modules = _imported(alone, tmp_path, *argv)
        assert code == 0 and not modules & _HEAVY_EVERYWHERE, (argv, modules & _HEAVY_EVERYWHERE)


@pytest.mark.parametrize(
    ("url", "refused"),
    [("http://192.0.2.7:8080", True), ("http://wm.example.org:8080", True), ("http://[::1]:8080", False),
     ("http://127.0.0.1:8080", False), ("http://localhost:8080", False), ("unix:///run/x.sock", False)],
)  # fmt: skip
def test_a_slurm_token_is_never_sent_over_plain_tcp_beyond_this_host(url, refused):
    ctx = client.ServiceContext(url)
    if refused:
        with pytest.raises(SiteError, match="never sent in clear"):
            ctx.call("POST", "/v1/sessions/s/cancel", body={}, slurm_token=True)
    else:
        ctx._check_token_channel()


def test_what_would_fail_later_is_refused_at_validate_as_in_process(both, tmp_path):
    """Issue 14: colliding environment stems, names over 64 characters, an abbreviated reserved
    option: exit 2 with the same problems through the service as in-process."""
    from tests.unit.test_wdf_catches_later_failures import STEMS_WDF, long_names_wdf

    ns = []
    for name in ("ns1", "ns2"):
        (tmp_path / name).mkdir()
        ns.append(f"{name.upper()}={tmp_path / name}")
    stems, long_step, abbreviated = tmp_path / "stems.yaml", tmp_path / "long.yaml", tmp_path / "abbr.yaml"
    stems.write_text(STEMS_WDF)
    long_step.write_text(long_names_wdf("step"))
    abbreviated.write_text(NO_SERVICE_WDF.replace("sbatch job.sh", "sbatch --test-on job.sh"))
    for path, fragment in (
        (stems, "services 'data-1' and 'data_1' both give the job the variables IOSEA_SERVICE_DATA_1_*"),
        (long_step, "a name has at most 64 characters, this one 65"),
        (abbreviated, "cannot give --test-on (that is --test-only)"),
    ):
        svc, local = both("validate", f"WORKFLOW={path}", *ns)
        assert svc == local
        assert svc[0] == 2 and fragment in svc[2] and "Traceback" not in svc[2]


def test_sigterm_stops_the_service_cleanly_exit_0_and_no_socket_left(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-term-", dir="/tmp"))
    try:
        sock = folder / "wm.sock"
        with running_service(sock, folder / "state") as proc:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        assert not sock.exists()
        assert "terminated" not in sock.with_suffix(".log").read_text()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_unusable_step_name_is_exit_2_before_the_session_is_looked_up(both):
    """Issue 14: `cancel STEP=<300 characters>` said "no such session" (exit 4); a step name no WDF
    can hold is a usage error, through the service and in-process alike."""
    svc, local = both("cancel", "SESSION=nosuch", "STEP=" + "a" * 300)
    assert svc == local
    assert svc[0] == 2 and "invalid step name" in svc[2] and "at most 64 characters" in svc[2]
