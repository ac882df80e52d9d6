"""The WDF corpus: valid files load on both sites, each invalid file fails where its header says.

An invalid file starts with one ``# expect: line N: <fragment>`` comment per problem it must
produce: some reported problem must be at line N and contain the fragment.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iosea_wf.errors import WDFError
from iosea_wf.site import load_site
from iosea_wf.wdf import Workflow, load_wdf
from tests.unit.wdf_fixtures import VARIABLES

HERE = Path(__file__).parent
VALID = sorted((HERE / "wdf_valid").glob("*.yaml"))
INVALID = sorted((HERE / "wdf_invalid").glob("*.yaml"))
DESIGN_NOTE = HERE.parents[2] / "shared" / "spec" / "workflow-manager-design-note.txt"
EXPECT = re.compile(rb"^# expect: line (\d+): (.+)$")


@pytest.fixture(scope="module", params=["inventories/local", "inventories/example"])
def site(request):
    return load_site(request.param)


@pytest.fixture(scope="module")
def local_site():
    return load_site("inventories/local")


def expectations(path: Path) -> list[tuple[int, str]]:
    """The (line, fragment) pairs of a corpus file's header."""
    found = []
    for raw in path.read_bytes().splitlines():
        if not raw.startswith(b"#"):
            break
        match = EXPECT.match(raw)
        if match:
            found.append((int(match.group(1)), match.group(2).decode("utf-8")))
    return found


def test_corpus_is_large_enough():
    assert len(INVALID) >= 35
    assert all(expectations(p) for p in INVALID), [p.name for p in INVALID if not expectations(p)]


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_wdf_loads_on_both_sites(path, site):
    workflow = load_wdf(path, VARIABLES, site)
    assert isinstance(workflow, Workflow)
    assert workflow.steps and all(s.location for s in workflow.steps.values())
    assert all(s.flavor in site.flavors for s in workflow.services.values())


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_wdf_reports_its_problems(path, local_site):
    with pytest.raises(WDFError) as caught:
        load_wdf(path, VARIABLES, local_site)
    problems = caught.value.problems
    reported = "\n".join(str(p) for p in problems)
    for line, fragment in expectations(path):
        assert any(p.line == line and fragment in str(p) for p in problems), (
            f"no problem at line {line} containing {fragment!r}; got:\n{reported}"
        )
    assert all(p.file == str(path) for p in problems)


def test_many_problems_are_reported_at_once(local_site):
    path = HERE / "wdf_invalid" / "many-problems-at-once.yaml"
    with pytest.raises(WDFError) as caught:
        load_wdf(path, VARIABLES, local_site)
    lines = [p.line for p in caught.value.problems]
    assert len(lines) >= 5 and lines == sorted(lines)


@pytest.mark.skipif(not DESIGN_NOTE.is_file(), reason="the shared design note is not checked out here")
def test_design_note_sample_as_written_gets_the_indentation_hint(tmp_path, local_site):
    sample = DESIGN_NOTE.read_text(encoding="utf-8").split("```\n")[1]
    line = sample.splitlines().index("    datamovers:") + 1
    wdf = tmp_path / "wdf.yaml"
    wdf.write_text(sample, encoding="utf-8")
    with pytest.raises(WDFError) as caught:
        load_wdf(wdf, VARIABLES, local_site)
    (problem,) = caught.value.problems
    assert (problem.line, problem.column) == (line, 5)
    assert "`datamovers:` is probably indented one level too little" in str(problem)
    assert str(problem).startswith(f"{wdf}:{line}:5: ")
