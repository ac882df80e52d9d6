"""The Workflow Manager service without Slurm or NFS: `iosea-wf serve` on a temporary socket.

The CLI talks to it (IOSEA_WF_URL=unix://...) and must print and exit exactly as in-process;
requests without valid proof of their caller are refused. Needs munged (the site's, or skipped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
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
def service(tmp_path_factory):
    """A running service: (socket path, state dir, TCP port). The socket's folder is open to all."""
    need_munge()
    folder = Path(tempfile.mkdtemp(prefix="iosea-wf-api-", dir="/tmp"))
    folder.chmod(0o755)
    sock, state = folder / "wm.sock", tmp_path_factory.mktemp("service-state")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        with running_service(sock, state, "--tcp", f"127.0.0.1:{port}"):
            yield sock, state, port
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def both(service, tmp_path, monkeypatch, capsys):
    """Run the CLI in-process twice: through the service and alone. both(*argv) -> (svc, local)."""
    sock, *_ = service
    local_state = tmp_path / "local-state"
    monkeypatch.delenv("IOSEA_WF_SITE", raising=False)

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
        ["status", "SESSION=bad/name"],
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
    assert seen_codes == {0, 2, 4}


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
