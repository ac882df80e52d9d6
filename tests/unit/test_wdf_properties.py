"""Property: whatever the bytes of a WDF, load_wdf returns a Workflow or raises WDFError.

Random YAML documents, random mutations of the valid sample (keys deleted, types changed,
entries duplicated, template expressions injected) and random bytes never produce any other
exception (a traceback for the user). When the CLI is there, ``iosea-wf validate`` on the same
file exits 0 or 2, never anything else. Every WDF found valid is also placed on the site's
datanodes and each of its steps planned as ``start`` and ``run`` would (no Ansible, no Slurm):
that too ends only with a result or an error whose exit code is in the table.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iosea_wf import jobs, manager, steps
from iosea_wf.errors import EXIT_CODES, IoseaError, WDFError
from iosea_wf.site import load_site
from iosea_wf.wdf import Workflow, load_wdf
from tests.unit.wdf_fixtures import VARIABLES

SAMPLE = Path(__file__).parent / "wdf_valid" / "sample-wdf.yaml"
SAMPLE_TEXT = SAMPLE.read_text(encoding="utf-8")
SAMPLE_DATA = yaml.safe_load(SAMPLE_TEXT)
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["sbatch x.sh", "{{ NS1 }}", "{{ x.y }}", "/mnt/a", "RO", "step_start", "flash", "2Gi", "NFS"]
    ),
)
keys = st.one_of(
    st.sampled_from(["workflow", "name", "services", "datamovers", "steps", "type", "attributes", "command"]),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)
)
injections = st.sampled_from(
    [
        "{{ x.y }}",
        "{{ a|e }}",
        "{{ f() }}",
        "{% for x in y %}{% endfor %}",
        "{# c #}",
        "{{",
        "{{ UNDEFINED }}",
        "}}",
    ]
)


HAS_CLI = importlib.util.find_spec("iosea_wf.cli") is not None


@pytest.fixture(scope="module")
def site():
    return load_site("inventories/local")


@pytest.fixture(scope="module")
def cli(site, tmp_path_factory, inprocess_site):
    """Run ``iosea-wf validate`` in-process (the site loaded once); None without a CLI.

    In-process for real: the local inventory names the site's service, which acts for users, never
    for root; the twin of the site that names none keeps the CLI here.
    """
    if not HAS_CLI:
        yield None
        return
    from iosea_wf import cli as cli_module

    state = tmp_path_factory.mktemp("wdf-cli-state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("iosea_wf.manager.load_site", lambda *_args, **_kwargs: site)
        patch.setenv("IOSEA_WF_SITE", str(inprocess_site))
        patch.delenv("IOSEA_WF_URL", raising=False)

        def validate(path: Path) -> int:
            argv = ["validate", f"WORKFLOW={path}", f"NS1={VARIABLES['NS1']}", f"NS2={VARIABLES['NS2']}"]
            return cli_module.main([*argv, "--state-dir", str(state)])

        yield validate


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("wdf-properties")


def load_never_crashes(path: Path, site, cli=None) -> None:
    """load_wdf gives a JSON-able Workflow or a WDFError with placed problems; nothing else."""
    if cli is not None:
        assert cli(path) in (0, 2)
    try:
        workflow = load_wdf(path, VARIABLES, site)
    except WDFError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert str(problem).startswith(str(path))
        return
    assert isinstance(workflow, Workflow)
    data = json.loads(json.dumps(workflow.to_dict()))
    assert Workflow.from_dict(data) == workflow
    plan_never_crashes(workflow, path, site)


def plan_never_crashes(workflow: Workflow, path: Path, site) -> None:
    """Place the services as start does and plan every step as run does: a table exit code at worst."""
    cwd = path.parent / "cwd"
    ctx = manager.Context(state_dir=str(path.parent / "state"), user="alice", _site=site)
    try:
        placements = manager.place_services(
            site, workflow, lambda _: {"cores": 0, "memory_mb": 0, "storage_gb": 0}
        )
    except IoseaError as exc:
        assert exc.exit_code in EXIT_CODES
        return
    record = manager.session_record(site, workflow, str(path), "alice", "s1", "0" * 32, placements, 0.0)
    record["state"] = "ACTIVE"
    for step in workflow.steps.values():
        cwd.mkdir(exist_ok=True)
        # The one check left to run: the batch script exists where `run` is called.
        script = jobs.parse_sbatch(step.command).script_and_args[:1]
        if script and not script[0].startswith("/") and "\0" not in script[0]:
            target = cwd / script[0]
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("#!/bin/sh\ntrue\n")
            except OSError:
                pass
        try:
            instance, pipeline = steps.plan_run(ctx, record, step.name, str(cwd))
        except IoseaError as exc:
            assert exc.exit_code in EXIT_CODES
            continue
        assert pipeline["step"]["argv"][0] == "sbatch"
        assert instance["name"] == step.name


def paths_in(data, prefix=()):
    """Every key path of ``data`` (mapping keys and list indexes)."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from paths_in(v, (*prefix, i))


ALL_PATHS = [p for p in paths_in(SAMPLE_DATA) if p]


@st.composite
def mutated_samples(draw):
    """The sample with one to three random mutations."""
    data = copy.deepcopy(SAMPLE_DATA)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            current = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this place
        if not isinstance(parent, dict | list):
            continue
        action = draw(st.sampled_from(["delete", "retype", "duplicate", "inject", "replace"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "retype":
            parent[path[-1]] = draw(documents)
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(current))
        elif action == "inject" and isinstance(current, str):
            cut = draw(st.integers(0, len(current)))
            parent[path[-1]] = current[:cut] + draw(injections) + current[cut:]
        else:
            parent[path[-1]] = draw(scalars)
    return data


@SETTINGS
@given(document=documents)
def test_random_yaml_documents(document, workdir, site):
    path = workdir / "random.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    load_never_crashes(path, site)


@SETTINGS
@given(data=mutated_samples())
def test_mutated_sample(data, workdir, site, cli):
    path = workdir / "mutated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    load_never_crashes(path, site, cli)


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.integers(0, len(SAMPLE_TEXT.encode())), st.binary(max_size=6)), max_size=4),
    cut=st.integers(0, 3),
)
def test_sample_with_random_bytes(edits, cut, workdir, site):
    raw = bytearray(SAMPLE_TEXT.encode())
    for position, chunk in edits:
        raw[position : position + cut] = chunk
    path = workdir / "bytes.yaml"
    path.write_bytes(bytes(raw))
    load_never_crashes(path, site)


@SETTINGS
@given(
    lines=st.lists(st.integers(0, len(SAMPLE_TEXT.splitlines()) - 1), max_size=3),
    shift=st.sampled_from([-2, 2, 4]),
)
def test_sample_with_shifted_lines(lines, shift, workdir, site):
    text = SAMPLE_TEXT.splitlines()
    for index in lines:
        line = text[index]
        text[index] = line[min(-shift, len(line) - len(line.lstrip())) :] if shift < 0 else " " * shift + line
    path = workdir / "shifted.yaml"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    load_never_crashes(path, site)


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_random_bytes(raw, workdir, site, cli):
    path = workdir / "binary.yaml"
    path.write_bytes(raw)
    load_never_crashes(path, site, cli)


name_text = st.text(alphabet="abcXYZ019_-.{}/ :'\n", min_size=0, max_size=10)
simple_names = st.sampled_from(["a", "b", "svc1", "svc2", "dm1", "dm2", "step_A", "..", ".x", "a" * 65])


@st.composite
def generated_workflows(draw):
    """WDFs built key by key, with service-level data movers, datanodes and {{ STEP }}: a clean
    one (valid but for its references) or a noisy one, where any value may be a wrong one."""
    names = st.one_of(simple_names, name_text)
    noisy = draw(st.booleans())

    def mostly(good, *others):
        if not noisy:
            return st.just(good)
        return st.one_of(
            st.just(good), *(o if isinstance(o, st.SearchStrategy) else st.just(o) for o in others)
        )

    def mover(k: int):
        return st.fixed_dictionaries(
            {
                "name": mostly(f"dm{k}", names),
                "trigger": st.sampled_from(["step_start", "step_stop"]) if not noisy else st.just("later"),
                "target": mostly("flash", "disk", "tape", "nowhere"),
                "operation": st.sampled_from(["copy", "move"]),
                "elements": mostly("in/*", ["a/*", "b/**"], "../x", "{{ STEP }}/*"),
            }
        )

    counter = iter(range(100))
    services = []
    for i in range(draw(st.integers(0, 3))):
        attributes = {
            "namespace": draw(mostly(f"/tmp/ns{i}", "/", "/tmp/a:b", "/tmp/{{ STEP }}")),
            "mountpoint": draw(mostly(f"/mnt/m{i}", "/", "/etc/x", "//etc", f"/scratch/{i}")),
        }
        if draw(st.booleans()):
            attributes["datanodes"] = draw(mostly(1, 2, 0, [1], "1", True))
        if draw(st.booleans()):
            attributes["flavor"] = draw(mostly("small", "medium", "large", "huge"))
        service = {"name": draw(mostly(f"svc{i}", names)), "type": "NFS", "attributes": attributes}
        if draw(st.booleans()):
            service["datamovers"] = [draw(mover(next(counter))) for _ in range(draw(st.integers(1, 2)))]
        services.append(service)
    data = {"workflow": {"name": draw(mostly("wf", names))}, "services": services}
    if draw(st.booleans()):
        data["datamovers"] = [draw(mover(next(counter))) for _ in range(draw(st.integers(1, 2)))]
    mover_names = [m["name"] for m in data.get("datamovers", [])] + [
        m["name"] for s in services for m in s.get("datamovers", [])
    ]
    steps_ = []
    for j in range(draw(st.integers(1, 3))):
        command = draw(
            mostly(
                "sbatch job.sh",
                "sbatch --output={{ STEP }}.out job.sh",
                "sbatch -N1 --time=5 sub/{{ STEP }}.sh",
                "sbatch --wrap 'echo {{ STEP }}'",
                "sbatch --parsable job.sh",
                "sbatch --test-on job.sh",
                "sbatch --part=gpu job.sh",
                "sbatch -vW job.sh",
            )
        )
        step = {"name": draw(mostly(f"step{j}", names)), "command": command}
        if draw(st.booleans()):
            step["location"] = draw(mostly("cpu_module", ["gpu_module"], "nomod"))
        uses = []
        for s in draw(st.lists(st.sampled_from(services), max_size=2, unique_by=id)) if services else []:
            use = {"name": s["name"] + draw(st.sampled_from(["", " RO", " RW"]))}
            if mover_names and draw(st.booleans()):
                use["datamovers"] = draw(st.lists(st.sampled_from(mover_names), max_size=2, unique=True))
            uses.append(use)
        if uses:
            step["services"] = uses
        steps_.append(step)
    data["steps"] = steps_
    return data


@SETTINGS
@given(data=generated_workflows())
def test_generated_workflows_load_place_and_plan(data, workdir, site, cli):
    path = workdir / "generated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    load_never_crashes(path, site, cli)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent / "wdf_valid").glob("*.yaml")), ids=lambda p: p.stem
)
def test_valid_corpus_is_placed_and_planned(path, site, tmp_path):
    copy_ = tmp_path / path.name
    copy_.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    workflow = load_wdf(copy_, VARIABLES, site)
    plan_never_crashes(workflow, copy_, site)
    # Relative scripts were created: every step of these files is planned (step.sh written).
    planned = list((tmp_path / "state" / "jobs").glob("*/*/step.sh"))
    scripts = [jobs.parse_sbatch(s.command).script_and_args for s in workflow.steps.values()]
    assert len(planned) == sum(1 for s in scripts if not s or not s[0].startswith("/")), planned
