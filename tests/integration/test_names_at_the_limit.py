"""Names of the longest length validate accepts (64 characters: workflow, session, service, data
mover, step) reach file names, job names, tier paths and the export, and work there: start, a
run with a data mover, status and stop on the real local site (issue 14, finding 12)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from iosea_wf.identity import current_user
from iosea_wf.site import load_site

WDF = """\
workflow:
  name: {w}
services:
  - name: {v}
    type: NFS
    attributes: {{namespace: {ns}, mountpoint: "/mnt/iosea-test/{{{{ SESSION }}}}/{v}"}}
datamovers:
  - {{name: {m}, trigger: step_start, target: flash, operation: copy, elements: "x"}}
steps:
  - name: {p}
    location: cpu_module
    command: "sbatch -o /dev/null --wrap true"
    services: [{{name: {v}, datamovers: [{m}]}}]
"""


def test_64_character_names_work_end_to_end(iosea, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "x").write_text("data\n")
    tag = str(os.getpid())
    session = ("s" * 64)[: 64 - len(tag)] + tag
    names = {k: k * 63 + "-" for k in "wvmp"}
    (tmp_path / "wdf.yaml").write_text(WDF.format(ns=ns, **names))
    r = iosea("start", "WORKFLOW=wdf.yaml", f"SESSION={session}")
    assert r.code == 0, r.err
    try:
        r = iosea("run", f"SESSION={session}", f"STEP={names['p']}", "--wait", "--json")
        assert r.code == 0 and "Traceback" not in r.err, r.err
        view = r.json()
        assert view["state"] == "COMPLETED" and view["datamovers"][0]["state"] == "COMPLETED", view
        assert (Path(view["datamovers"][0]["target_path"]) / "x").read_text() == "data\n"
        status = json.loads(iosea("status", f"SESSION={session}", "--json").out)
        assert status["services"][0]["state"] == "ACTIVE"
    finally:
        r = iosea("stop", f"SESSION={session}", "--force")
        for tier in load_site().tiers.values():
            for d in Path(tier.path, current_user()).glob(f"{session}.*"):
                shutil.rmtree(d, ignore_errors=True)
    assert r.code == 0, r.err
