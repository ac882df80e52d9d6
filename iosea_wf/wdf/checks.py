"""Checks that span entries of a WDF (names, references, paths) and checks against the site.

They run on the substituted data even where the schemas found problems, so one run reports every
problem; a value of the wrong type is skipped here because its schema already reported it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import voluptuous as vol

from ..jobs import env_name
from ..permissions import user_may
from ..site import Site
from .problems import Path, Problems, format_path
from .schema import one_of, step_service_ref


def entries(data: dict[str, Any], section: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, entry) for each mapping entry of a list section; anything else is skipped."""
    items = data.get(section)
    if isinstance(items, list):
        for i, item in enumerate(items):
            if isinstance(item, dict):
                yield i, item


def unique_names(data: dict[str, Any], section: str, what: str, problems: Problems) -> list[str] | None:
    """The names defined in ``section`` (file order), reporting duplicates; None if it is no list."""
    if section in data and not isinstance(data[section], list):
        return None
    first: dict[str, Path] = {}
    for i, item in entries(data, section):
        value = item.get("name")
        if not isinstance(value, str):
            continue
        path = (section, i, "name")
        if value in first:
            line = problems.marks[first[value]].line if first[value] in problems.marks else "?"
            problems.add(
                path, f"duplicate {what} name {value!r} (first defined at line {line})", "a unique name"
            )
        else:
            first[value] = path
    return list(first)


def all_datamovers(data: dict[str, Any]) -> Iterator[tuple[Path, Any, str | None]]:
    """(path, entry, owning service or None) of every data mover: top-level ones, then each
    service's own (``datamovers`` beside ``attributes``, as in the design note)."""
    items = data.get("datamovers")
    if isinstance(items, list):
        for i, item in enumerate(items):
            yield ("datamovers", i), item, None
    for i, service in entries(data, "services"):
        items = service.get("datamovers")
        owner = service.get("name") if isinstance(service.get("name"), str) else f"#{i + 1}"
        if isinstance(items, list):
            for j, item in enumerate(items):
                yield ("services", i, "datamovers", j), item, owner


def unique_mover_names(data: dict[str, Any], problems: Problems) -> dict[str, str | None] | None:
    """Data mover name -> owning service (None: top level), reporting names defined twice anywhere.

    None when the top-level section is not a list (already reported).
    """
    if "datamovers" in data and not isinstance(data["datamovers"], list):
        return None
    first: dict[str, Path] = {}
    owners: dict[str, str | None] = {}
    for path, item, owner in all_datamovers(data):
        value = item.get("name") if isinstance(item, dict) else None
        if not isinstance(value, str):
            continue
        if value in first:
            mark = problems.marks.get((*first[value], "name"))
            problems.add(
                (*path, "name"),
                f"duplicate data mover name {value!r} (first defined at line {mark.line if mark else '?'})",
                "a name unique across the top-level and every service's data movers",
            )
        else:
            first[value], owners[value] = path, owner
    return owners


def references(
    data: dict[str, Any],
    services: list[str] | None,
    datamovers: dict[str, str | None] | None,
    problems: Problems,
) -> None:
    """Every service and data mover a step names must be defined, and named once per step; a
    data mover defined inside a service may only be used with that service.

    A section that is not a list (already reported) is not used: each of its names would be
    reported as unknown, which says nothing new.
    """
    for i, step in entries(data, "steps"):
        used: dict[str, int] = {}
        for j, entry in _sub_entries(step, "services"):
            path = ("steps", i, "services", j)
            try:
                service, _ = step_service_ref(entry.get("name"))
            except vol.Invalid:
                continue
            if services is None:
                pass
            elif service not in services:
                problems.add((*path, "name"), f"unknown service {service!r}", one_of(services))
            elif service in used:
                problems.add(
                    (*path, "name"), f"service {service!r} is listed twice in this step", "each service once"
                )
            used.setdefault(service, j)
            movers = entry.get("datamovers")
            if not isinstance(movers, list) or datamovers is None:
                continue
            seen: set[str] = set()
            usable = [m for m, owner in datamovers.items() if owner in (None, service)]
            allowed = (
                one_of(usable)
                if usable
                else f"a data mover defined at the top level or inside service {service!r}, and there is none"
            )
            for k, mover in enumerate(movers):
                if not isinstance(mover, str):
                    continue
                if mover not in datamovers:
                    problems.add((*path, "datamovers", k), f"unknown data mover {mover!r}", allowed)
                elif datamovers[mover] not in (None, service):
                    problems.add(
                        (*path, "datamovers", k),
                        f"data mover {mover!r} belongs to service {datamovers[mover]!r}, not to {service!r}",
                        allowed,
                    )
                elif mover in seen:
                    problems.add(
                        (*path, "datamovers", k), f"data mover {mover!r} is listed twice", "each once"
                    )
                seen.add(mover)


def distinct_env_stems(data: dict[str, Any], problems: Problems) -> None:
    """No two services may share an environment stem (``data-1`` and ``data_1`` are both
    ``IOSEA_SERVICE_DATA_1_*``): a job using both would see only one of them."""
    owner: dict[str, str] = {}
    for i, service in entries(data, "services"):
        value = service.get("name")
        if not isinstance(value, str):
            continue
        stem = env_name(value)
        if stem in owner and owner[stem] != value:  # the same name twice is reported as a duplicate
            problems.add(
                ("services", i, "name"),
                f"services {owner[stem]!r} and {value!r} both give the job the variables {stem}_*",
                "service names that stay distinct once '-' and '.' become '_' and letters are upper-cased",
            )
        else:
            owner.setdefault(stem, value)


def distinct_paths(data: dict[str, Any], problems: Problems) -> None:
    """No two services may share a mountpoint or a namespace."""
    for attribute in ("mountpoint", "namespace"):
        owner: dict[str, str] = {}
        for i, service in entries(data, "services"):
            attributes = service.get("attributes")
            if not isinstance(attributes, dict):
                continue
            value = attributes.get(attribute)
            if not isinstance(value, str) or not value.startswith("/"):
                continue
            normal = "/" + "/".join(p for p in value.split("/") if p and p != ".")
            name = service.get("name") if isinstance(service.get("name"), str) else f"#{i + 1}"
            if normal in owner:
                problems.add(
                    ("services", i, "attributes", attribute),
                    f"{attribute} {value!r} is already used by service {owner[normal]!r}",
                    f"a {attribute} of its own for each service",
                )
            else:
                owner[normal] = name


def against_site(data: dict[str, Any], site: Site, problems: Problems) -> None:
    """Every module, flavor, tier and service type the WDF names must exist on the site."""
    modules = list(site.modules)
    for i, service in entries(data, "services"):
        kind = service.get("type")
        if isinstance(kind, str) and kind not in site.service_types:
            problems.add(
                ("services", i, "type"),
                f"service type {kind!r} is not offered by the site {site.path.name}",
                one_of(list(site.service_types)),
            )
        attributes = service.get("attributes")
        if not isinstance(attributes, dict):
            continue
        flavor = attributes.get("flavor")
        if isinstance(flavor, str) and flavor not in site.flavors:
            problems.add(
                ("services", i, "attributes", "flavor"),
                f"unknown flavor {flavor!r}",
                one_of(list(site.flavors)),
            )
        location = attributes.get("location")
        if isinstance(location, str) and location not in site.modules:
            problems.add(
                ("services", i, "attributes", "location"), f"unknown module {location!r}", one_of(modules)
            )
    for path, mover, _ in all_datamovers(data):
        target = mover.get("target") if isinstance(mover, dict) else None
        if isinstance(target, str) and target not in site.tiers:
            problems.add((*path, "target"), f"unknown storage tier {target!r}", one_of(list(site.tiers)))
    for i, step in entries(data, "steps"):
        attach = step.get("attach")
        if isinstance(attach, str) and attach not in site.attach_methods:
            problems.add(
                ("steps", i, "attach"),
                f"attach method {attach!r} is not offered by the site {site.path.name}",
                one_of(list(site.attach_methods)),
            )
        location = step.get("location")
        if isinstance(location, str):
            if location not in site.modules:
                problems.add(("steps", i, "location"), f"unknown module {location!r}", one_of(modules))
        elif isinstance(location, list):
            for k, module in enumerate(location):
                if isinstance(module, str) and module not in site.modules:
                    problems.add(("steps", i, "location", k), f"unknown module {module!r}", one_of(modules))


def service_needs(data: dict[str, Any]) -> dict[str, str]:
    """Per service name, what its owner must be allowed: "w" if a step uses it RW or moves data out."""
    movers = {
        m["name"]: m.get("operation")
        for _, m in entries(data, "datamovers")
        if isinstance(m.get("name"), str)
    }
    needs: dict[str, str] = {}
    for _, service in entries(data, "services"):
        if isinstance(service.get("name"), str):
            own = service.get("datamovers")
            moves = isinstance(own, list) and any(
                isinstance(m, dict) and m.get("operation") == "move" for m in own
            )
            needs[service["name"]] = "w" if moves else "r"
    for _, step in entries(data, "steps"):
        for _, entry in _sub_entries(step, "services"):
            try:
                service, mode = step_service_ref(entry.get("name"))
            except vol.Invalid:
                continue
            used = entry.get("datamovers") if isinstance(entry.get("datamovers"), list) else []
            # A `move` removes the files it moved from the namespace: that is a write.
            if mode == "RW" or any(isinstance(m, str) and movers.get(m) == "move" for m in used):
                needs[service] = "w"
    return needs


def namespaces(data: dict[str, Any], site: Site, owner: str, problems: Problems) -> None:
    """Each namespace, symlinks followed, is an existing directory below a site namespace root that
    ``owner`` may read (and write, where a step uses the service RW)."""
    roots = site.namespace_roots
    needs = service_needs(data)
    for i, service in entries(data, "services"):
        attributes = service.get("attributes")
        if not isinstance(attributes, dict):
            continue
        value = attributes.get("namespace")
        path = ("services", i, "attributes", "namespace")
        if not isinstance(value, str) or not value.startswith("/"):
            continue
        if any(p.path == format_path(path) for p in problems.found):
            continue  # its syntax is already reported
        resolved = os.path.realpath(value)
        shown = value if resolved == os.path.normpath(value) else f"{value} (resolves to {resolved})"
        where = ", ".join(roots) or "(none: the site sets no iosea_namespace_roots)"
        if not any(resolved != r and os.path.commonpath([resolved, r]) == r for r in roots):
            problems.add(
                path,
                f"namespace {shown} is not inside the site's namespace roots",
                f"an existing directory below one of {where}",
            )
            continue
        if not os.path.isdir(resolved):
            problems.add(
                path,
                f"namespace {shown} is not an existing directory",
                "an existing directory (create it first; iosea-wf never creates namespaces)",
            )
            continue
        name = service.get("name")
        need = needs.get(name, "r") if isinstance(name, str) else "r"
        if not user_may(owner, resolved, need):
            what = "read and write" if need == "w" else "read"
            why = " (a step uses it RW or moves data out of it)" if need == "w" else ""
            problems.add(
                path,
                f"user {owner} may not {what} namespace {shown}{why}",
                f"a directory {owner} can {what}",
            )


def _sub_entries(entry: dict[str, Any], key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    items = entry.get(key)
    if isinstance(items, list):
        for j, item in enumerate(items):
            if isinstance(item, dict):
                yield j, item
