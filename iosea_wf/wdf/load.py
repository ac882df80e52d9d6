"""Load a WDF: read it, substitute its variables, check it whole, and build the Workflow.

The order matters: variables are substituted before the schemas run, so a substituted value (a
mountpoint, a size) is checked like one written out; every stage records its problems and the
next stages still run, so a single WDFError lists every problem of the file.
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Any

from ..errors import UsageError
from ..jobs import parse_sbatch
from ..site import Site
from . import checks
from .loader import compose_marked, read_text
from .model import DataMover, Service, Step, StepService, Workflow
from .problems import Problems
from .schema import (
    DATAMOVER,
    SBATCH_EXPECTED,
    SERVICE,
    SERVICE_TYPES,
    STEP,
    STEP_SERVICE,
    TOP_LEVEL,
    WORKFLOW,
    check,
    keys_of,
    one_of,
)
from .variables import STEP_VARIABLE, substitute


def load_wdf(
    path: str | os.PathLike,
    variables: dict[str, str],
    site: Site | None = None,
    *,
    owner: str | None = None,
    text: str | None = None,
) -> Workflow:
    """The validated workflow of the WDF at ``path``; WDFError listing every problem otherwise.

    With ``owner`` (and a site), namespaces are checked on this host too: inside the site's roots,
    existing, and usable by that user. With ``text`` (the file as its owner read it), ``path``
    only names it and is not read.
    """
    problems = Problems(str(path))
    raw = compose_marked(read_text(FsPath(path), problems) if text is None else text, problems)
    if not isinstance(raw, dict):
        problems.add(
            (), "the top level must be a mapping", "the keys " + ", ".join(keys_of(TOP_LEVEL)), value=None
        )
        problems.fail()
    variables = {str(k): str(v) for k, v in (variables or {}).items()}
    data = {
        key: _substitute_steps(value, variables, problems) if key == "steps" else
        substitute(value, variables, problems, (key,))
        for key, value in raw.items()
    }  # fmt: skip

    check(TOP_LEVEL, data, (), problems, "the workflow description")
    # A section of the wrong type is reported by TOP_LEVEL; its entries are checked only if it is one.
    section = data.get("workflow")
    workflow = (
        check(WORKFLOW, section, ("workflow",), problems, "workflow") if isinstance(section, dict) else None
    )
    services = [_service(i, item, problems) for i, item in enumerate(_list(data, "services"))]
    movers = [
        (check(DATAMOVER, item, path, problems, "a data mover"), owner)
        for path, item, owner in checks.all_datamovers(data)
    ]
    steps = [_step(i, item, problems) for i, item in enumerate(_list(data, "steps"))]

    service_names = checks.unique_names(data, "services", "service", problems)
    mover_names = checks.unique_mover_names(data, problems)
    checks.unique_names(data, "steps", "step", problems)
    checks.references(data, service_names, mover_names, problems)
    checks.distinct_env_stems(data, problems)
    checks.distinct_paths(data, problems)
    if site is not None:
        checks.against_site(data, site, problems)
        if owner is not None:
            checks.namespaces(data, site, owner, problems)
    problems.raise_if_any()

    # No problem was found: every validated part below is present.
    return Workflow(
        name=workflow["name"],
        source=str(path),
        variables=variables,
        services={s.name: s for s in (_build_service(s, site) for s in services)},
        datamovers={m.name: m for m in (_build_mover(*m) for m in movers)},
        steps={s.name: s for s in (_build_step(s, site) for s in steps)},
    )


def _substitute_steps(steps: Any, variables: dict[str, str], problems: Problems) -> Any:
    """The steps with their variables substituted; inside a step, ``{{ STEP }}`` is its name."""
    if not isinstance(steps, list):
        return substitute(steps, variables, problems, ("steps",))
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            out.append(substitute(step, variables, problems, ("steps", i)))
            continue
        # The name itself sees only the workflow's variables: it is what STEP stands for.
        name = substitute(step.get("name"), variables, problems, ("steps", i, "name"))
        own = {**variables, STEP_VARIABLE: name} if isinstance(name, str) else variables
        out.append(
            {
                k: name if k == "name" else substitute(v, own, problems, ("steps", i, k))
                for k, v in step.items()
            }
        )
    return out


def _list(data: dict[str, Any], section: str) -> list[Any]:
    value = data.get(section)
    return value if isinstance(value, list) else []


def _service(i: int, item: Any, problems: Problems) -> tuple[dict | None, dict | None]:
    """The validated service entry and its validated attributes (None where invalid)."""
    entry = check(SERVICE, item, ("services", i), problems, "a service")
    if not isinstance(item, dict):
        return entry, None
    kind, attributes = item.get("type"), item.get("attributes")
    if not isinstance(kind, str) or not kind.strip():
        return entry, None
    schema = SERVICE_TYPES.get(kind)
    if schema is None:
        problems.add(("services", i, "type"), f"unknown service type {kind!r}", one_of(list(SERVICE_TYPES)))
        return entry, None
    if not isinstance(attributes, dict):
        return entry, None
    return entry, check(schema, attributes, ("services", i, "attributes"), problems, f"{kind} attributes")


def _step(i: int, item: Any, problems: Problems) -> tuple[dict | None, list[dict | None]]:
    """The validated step entry and its validated service entries."""
    entry = check(STEP, item, ("steps", i), problems, "a step")
    if isinstance(item, dict) and "location" in item:
        _command_against_location(i, item.get("command"), problems)
    uses = item.get("services") if isinstance(item, dict) else None
    if not isinstance(uses, list):
        return entry, []
    return entry, [
        check(STEP_SERVICE, use, ("steps", i, "services", j), problems, "a service of a step")
        for j, use in enumerate(uses)
    ]


def _command_against_location(i: int, command: Any, problems: Problems) -> None:
    """A step that gives a location may not choose the partition in its command too."""
    if not isinstance(command, str):
        return
    try:
        parse_sbatch(command)
    except UsageError:
        return  # the schema reported it already
    try:
        parse_sbatch(command, location_given=True)
    except UsageError as exc:
        problems.add(("steps", i, "command"), exc.message, SBATCH_EXPECTED)


def _build_service(validated: tuple[dict, dict], site: Site | None) -> Service:
    entry, attributes = validated
    attributes = dict(attributes)
    if site is not None and "flavor" not in attributes:
        attributes["flavor"] = site.default_flavor
    return Service(name=entry["name"], type=entry["type"], attributes=attributes)


def _build_mover(entry: dict, service: str | None) -> DataMover:
    return DataMover(
        name=entry["name"],
        trigger=entry["trigger"],
        target=entry["target"],
        operation=entry["operation"],
        elements=tuple(entry["elements"]),
        service=service,
    )


def _build_step(validated: tuple[dict, list[dict]], site: Site | None) -> Step:
    entry, uses = validated
    if "location" in entry:
        location = tuple(entry["location"])
    else:
        location = (site.default_module,) if site is not None else ()
    return Step(
        name=entry["name"],
        location=location,
        command=entry["command"],
        services=tuple(
            StepService(name=use["name"][0], mode=use["name"][1], datamovers=tuple(use.get("datamovers", ())))
            for use in uses
        ),
        attach=entry.get("attach"),
    )
