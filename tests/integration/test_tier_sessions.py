"""Tier data of different sessions never meet: a reused session name keeps the earlier data (issue 12, 2b)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from iosea_wf.identity import current_user
from iosea_wf.site import load_site

WDF = """\
workflow:
  name: reuse
services:
  - name: es
    type: NFS
    attributes:
      namespace: {ns}
      mountpoint: /mnt/iosea-test/{{{{ SESSION }}}}/es
datamovers:
  - name: archive
    trigger: step_stop
    target: tape
    operation: move
    elements: "gauges/g1.hdf5"
steps:
  - name: produce
    location: cpu_module
    command: 'sbatch -o /dev/null --wrap "true"'
    services:
      - name: es RW
        datamovers: [archive]
"""


def test_two_sessions_of_one_name_each_keep_their_g1_on_tape(iosea, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = f"reuse-{os.getpid()}"
    tape_root = Path(load_site().tiers["tape"].path, current_user())
    seen = []
    try:
        for round_ in range(2):
            ns = tmp_path / f"ns{round_}"
            (ns / "gauges").mkdir(parents=True)
            data = os.urandom(40_000 + round_)
            (ns / "gauges" / "g1.hdf5").write_bytes(data)
            wdf = tmp_path / f"wdf{round_}.yaml"
            wdf.write_text(WDF.format(ns=ns))
            r = iosea("start", f"WORKFLOW={wdf}", f"SESSION={session}")
            assert r.code == 0, r.err
            r = iosea("run", f"SESSION={session}", "STEP=produce", "--wait", "--json")
            assert r.code == 0, r.err + r.out
            status = iosea("status", f"SESSION={session}", "--json").json()
            mover = status["steps"][0]["datamovers"][0]
            assert mover["state"] == "COMPLETED", mover
            target = Path(mover["target_path"])
            # the session's own directory: recognisable by its name, unique by its id
            assert target == tape_root / f"{session}.{status['id'][:12]}" / "es"
            assert not (ns / "gauges" / "g1.hdf5").exists()  # moved
            seen.append((status["id"], target, hashlib.sha256(data).hexdigest()))
            r = iosea("status", f"SESSION={session}")
            assert str(target) in r.out.replace("\n", "") or status["id"][:12] in r.out
            assert iosea("stop", f"SESSION={session}").code == 0  # stopped before the next starts
        (id1, t1, d1), (id2, t2, d2) = seen
        assert id1 != id2 and t1 != t2 and d1 != d2
        # both files are on tape afterwards, each where its session's status said
        for target, digest in ((t1, d1), (t2, d2)):
            assert hashlib.sha256((target / "gauges" / "g1.hdf5").read_bytes()).hexdigest() == digest
    finally:
        for _, target, _ in seen:
            shutil.rmtree(target.parent, ignore_errors=True)
