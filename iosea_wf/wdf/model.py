"""The validated workflow: what a WDF describes once every check has passed.

These objects are plain data. ``Workflow.to_dict``/``Workflow.from_dict`` give the JSON form the
session store keeps, so a session runs the WDF as it was when the session started.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import WDFError

# Bumped whenever the stored form of a workflow changes (STYLE.md: stored records carry a version).
SCHEMA_VERSION = 1

# What `validate` puts in SESSION when the user gives none, so session-dependent paths still check.
SESSION_PLACEHOLDER = "SESSION"

# Names of workflows, services, data movers, steps and sessions: they become directory names,
# job names and (later) OWNER/NAME keys, so never '/', never a leading '.' ('.', '..', hidden).
NAME_MAX = 64
NAME_RULE = f"1-{NAME_MAX} letters, digits, '_', '-' or '.', not starting with '.'"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]*")


def name_problem(value: str) -> str | None:
    """Why ``value`` is not a valid name (see NAME_RULE), or None if it is one."""
    if not value:
        return "a name cannot be empty"
    if len(value) > NAME_MAX:
        return f"a name has at most {NAME_MAX} characters, this one {len(value)}"
    if value.startswith("."):
        return "a name cannot start with '.'"
    bad = next((c for c in value if not _NAME_CHARS.fullmatch(c)), None)
    if bad is not None:
        shown = "a blank" if bad.isspace() else repr(bad) if bad.isprintable() else "a control character"
        return f"a name cannot contain {shown}"
    return None


ACCESS_MODES = ("RO", "RW")
DEFAULT_ACCESS_MODE = "RW"
TRIGGERS = ("step_start", "step_stop")
OPERATIONS = ("copy", "move")


@dataclass(frozen=True)
class WDFProblem:
    """One problem found in a WDF, with where it is and what would be accepted."""

    file: str
    line: int | None
    column: int | None
    path: str
    value: str | None
    message: str
    expected: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        if self.expected:
            text += f" (expected {self.expected})"
        return text


@dataclass(frozen=True)
class Service:
    """An ephemeral I/O service: its type and its attributes (variables substituted)."""

    name: str
    type: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def namespace(self) -> str | None:
        """The dataset namespace the service serves."""
        return self.attributes.get("namespace")

    @property
    def mountpoint(self) -> str | None:
        """Where the service is mounted on the compute nodes."""
        return self.attributes.get("mountpoint")

    @property
    def flavor(self) -> str | None:
        """The site flavor reserved for the service (the site default when the WDF gives none)."""
        return self.attributes.get("flavor")

    @property
    def storagesize_bytes(self) -> int | None:
        """The requested storage size in bytes, or None when the WDF gives none."""
        return self.attributes.get("storagesize")


@dataclass(frozen=True)
class DataMover:
    """A data transfer between a service and a storage tier, run when a step starts or stops."""

    name: str
    trigger: str
    target: str
    operation: str
    elements: tuple[str, ...]
    # The service that owns it (defined inside that service), or None for a top-level one.
    service: str | None = None


@dataclass(frozen=True)
class StepService:
    """A service a step uses, its access mode and the data movers attached to it."""

    name: str
    mode: str = DEFAULT_ACCESS_MODE
    datamovers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    """A Slurm job of the workflow: where it runs, its sbatch command and the services it uses."""

    name: str
    location: tuple[str, ...]
    command: str
    services: tuple[StepService, ...] = ()
    # The attach method the WDF chose for the step's job (None: the site's default).
    attach: str | None = None


@dataclass(frozen=True)
class Workflow:
    """A validated WDF: its services, data movers and steps, in file order."""

    name: str
    source: str
    variables: dict[str, str]
    services: dict[str, Service]
    datamovers: dict[str, DataMover]
    steps: dict[str, Step]

    def to_dict(self) -> dict[str, Any]:
        """The workflow as plain JSON-able data (what the session store keeps)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "source": self.source,
            "variables": dict(self.variables),
            "services": [
                {"name": s.name, "type": s.type, "attributes": dict(s.attributes)}
                for s in self.services.values()
            ],
            "datamovers": [
                {
                    "name": d.name,
                    "trigger": d.trigger,
                    "target": d.target,
                    "operation": d.operation,
                    "elements": list(d.elements),
                    "service": d.service,
                }
                for d in self.datamovers.values()
            ],
            "steps": [
                {
                    "name": s.name,
                    "location": list(s.location),
                    "command": s.command,
                    "services": [
                        {"name": ss.name, "mode": ss.mode, "datamovers": list(ss.datamovers)}
                        for ss in s.services
                    ],
                    "attach": s.attach,
                }
                for s in self.steps.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workflow:
        """Rebuild a workflow from :meth:`to_dict` output; WDFError if the record is not one."""
        if not isinstance(data, dict):
            raise WDFError("the stored workflow record is not a mapping")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise WDFError(
                f"the stored workflow record has schema version {version!r}, expected {SCHEMA_VERSION}"
            )
        try:
            services = [Service(s["name"], s["type"], dict(s["attributes"])) for s in data["services"]]
            datamovers = [
                DataMover(
                    d["name"],
                    d["trigger"],
                    d["target"],
                    d["operation"],
                    tuple(d["elements"]),
                    d.get("service"),
                )
                for d in data["datamovers"]
            ]
            steps = [
                Step(
                    s["name"],
                    tuple(s["location"]),
                    s["command"],
                    tuple(StepService(x["name"], x["mode"], tuple(x["datamovers"])) for x in s["services"]),
                    # Sessions recorded before steps could choose have no such key.
                    s.get("attach"),
                )
                for s in data["steps"]
            ]
            return cls(
                name=data["name"],
                source=data["source"],
                variables=dict(data["variables"]),
                services={s.name: s for s in services},
                datamovers={d.name: d for d in datamovers},
                steps={s.name: s for s in steps},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WDFError(f"the stored workflow record is incomplete or malformed ({exc!r})") from None
