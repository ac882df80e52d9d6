"""The voluptuous schemas of every WDF section, and the registry of service types.

Each schema describes one flat mapping (the top level, the workflow, one service, one data mover,
one step, one service of a step). Lists are walked by :mod:`iosea_wf.wdf.load` item by item,
because voluptuous stops at the first bad item of a list and every problem must be reported.
All schemas are compiled once, here, at import.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import voluptuous as vol

from ..errors import UsageError
from ..jobs import parse_sbatch
from ..site import ATTACH_METHODS
from .model import ACCESS_MODES, DEFAULT_ACCESS_MODE, NAME_RULE, OPERATIONS, TRIGGERS, name_problem
from .problems import Path, Problems


class Expected(vol.Invalid):
    """A validation failure that also says what would have been accepted."""

    def __init__(self, message: str, expected: str | None = None):
        super().__init__(message)
        self.expected = expected


def one_of(choices: tuple[str, ...] | list[str]) -> str:
    """``one of: a, b, c``, as an ``expected`` text."""
    return "one of: " + ", ".join(choices) if choices else "a name defined in the file, and there is none"


# ---- value validators --------------------------------------------------------------------------

NAME_EXPECTED = NAME_RULE


def name(value: Any) -> str:
    """A name: letters, digits, '_', '-', '.', not starting with '.', at most 64 characters."""
    if not isinstance(value, str) or not value:
        raise Expected(f"expected a name, got {_shown(value)}", NAME_EXPECTED)
    why = name_problem(value)
    if why is not None:
        raise Expected(f"invalid name {_shown(value)}: {why}", NAME_EXPECTED)
    return value


def text(value: Any) -> str:
    """Non-empty text."""
    if not isinstance(value, str) or not value.strip():
        raise Expected(f"expected text, got {_shown(value)}", "a non-empty string")
    return value


def choice(*choices: str):
    """A validator accepting exactly one of ``choices``."""

    def validate(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise Expected(f"invalid value {_shown(value)}", one_of(choices))
        return value

    return validate


# Characters a path may not hold: quotes and ':' break the bind attach (SRC:DST:MODE) and the
# ganesha configuration; control characters (a newline) could start a new configuration line.
PATH_CHARS_EXPECTED = "no control character, quote or ':'"
_PATH_BAD_CHARS = "'\"`:"
PATH_EXPECTED = f"an absolute path with {PATH_CHARS_EXPECTED}"

# System directories a service must never be mounted over (nor under).
SYSTEM_DIRECTORIES = (
    "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/boot",
    "/root", "/run", "/var/lib", "/var/log", "/var/spool",
)  # fmt: skip


def path_chars_problem(value: str) -> str | None:
    """Why ``value`` holds a character no path of a WDF may hold, or None."""
    for c in value:
        if c in _PATH_BAD_CHARS:
            return f"it contains {c!r}"
        if not c.isprintable():
            return f"it contains a control character ({c!r})"
    return None


def absolute_path(value: Any) -> str:
    """An absolute path without control characters, quotes or ':', normalized."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise Expected(f"expected an absolute path, got {_shown(value)}", PATH_EXPECTED)
    why = path_chars_problem(value)
    if why is not None:
        raise Expected(f"invalid path {_shown(value)}: {why}", PATH_EXPECTED)
    # normpath keeps a leading '//' (POSIX leaves its meaning open): '//etc' is '/etc' here.
    return "/" + posixpath.normpath(value).lstrip("/")


def mountpoint(value: Any) -> str:
    """An absolute, normalized path that is not '/' and not inside a system directory."""
    path = absolute_path(value)
    expected = f"{PATH_EXPECTED}, outside {', '.join(SYSTEM_DIRECTORIES)}, such as /mnt/data"
    if path == "/":
        raise Expected("a service cannot be mounted on '/'", expected)
    system = next((d for d in SYSTEM_DIRECTORIES if path == d or path.startswith(d + "/")), None)
    if system is not None:
        raise Expected(f"mountpoint {path!r} is inside the system directory {system}", expected)
    return path


def pattern(value: Any) -> str:
    """A relative glob pattern that cannot reach outside the directory it applies to."""
    expected = "a relative glob pattern such as 'input/*.h5', without '..'"
    if not isinstance(value, str) or not value:
        raise Expected(f"expected a glob pattern, got {_shown(value)}", expected)
    if value.startswith(("/", "~")):
        raise Expected(f"pattern {value!r} is absolute: it could reach outside the service", expected)
    why = path_chars_problem(value)
    if why is not None:
        raise Expected(f"invalid pattern {_shown(value)}: {why}", expected)
    if ".." in value.split("/"):
        raise Expected(f"pattern {value!r} has a '..' component: it could escape the service", expected)
    return value


def patterns(value: Any) -> list[str]:
    """One glob pattern or a non-empty list of them."""
    if isinstance(value, str):
        return [pattern(value)]
    if not isinstance(value, list) or not value:
        raise Expected(
            f"expected a glob pattern or a list of them, got {_shown(value)}", "a pattern or a list"
        )
    return _each(value, pattern)


def names(value: Any) -> list[str]:
    """One name or a non-empty list of names (a step's modules)."""
    if isinstance(value, str):
        return [name(value)]
    if not isinstance(value, list) or not value:
        raise Expected(
            f"expected a name or a list of names, got {_shown(value)}", "a name or a non-empty list"
        )
    return _each(value, name)


def name_list(value: Any) -> list[str]:
    """A list of names (possibly empty)."""
    if not isinstance(value, list):
        raise Expected(
            f"expected a list of names, got {_shown(value)}", "a list such as [datamover1, datamover2]"
        )
    return _each(value, name)


def _each(values: list[Any], validate) -> list[Any]:
    """Each item validated; every bad item is reported, not only the first."""
    errors, out = [], []
    for i, item in enumerate(values):
        try:
            out.append(validate(item))
        except vol.Invalid as exc:
            exc.prepend([i])
            errors.append(exc)
    if errors:
        raise vol.MultipleInvalid(errors)
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kKmMgGtTpPeE])(i?)[bB]?|[bB])?\s*$")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
MAX_SIZE = 2**63
SIZE_EXPECTED = "a size such as 2Gi, 2GiB, 500GB, 1.5T or a number of bytes"


def size(value: Any) -> int:
    """A storage size (``2Gi``, ``2GiB``, ``500GB``, ``1.5T``, a number), in bytes."""
    if isinstance(value, bool):
        raise Expected(f"expected a size, got {value!r}", SIZE_EXPECTED)
    if isinstance(value, int):
        scaled: float | int = value
    elif isinstance(value, float):
        scaled = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit, binary = m.group(2), m.group(3)
        factor = (1024 if binary else 1000) ** _POWERS[unit.lower()] if unit else 1
        scaled = float(m.group(1)) * factor
    else:
        raise Expected(f"invalid size {_shown(value)}", SIZE_EXPECTED)
    # NaN, infinities and sizes beyond a 64-bit byte count are typos, not storage requests.
    if not scaled == scaled or abs(scaled) >= MAX_SIZE:
        raise Expected(f"invalid size {_shown(value)}: too large or not a number", SIZE_EXPECTED)
    result = round(scaled)
    if result <= 0:
        raise Expected(f"a storage size must be positive, got {_shown(value)}", SIZE_EXPECTED)
    return result


def datanode_count(most: int):
    """A validator of ``attributes.datanodes``: how many datanodes the service spans, 1 to ``most``."""
    expected = "an integer: the number of datanodes the service spans" + (
        ", 1 for this service type" if most == 1 else f", from 1 to {most}"
    )

    def validate(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Expected(
                f"datanodes is a number of datanodes: expected an integer, got {_shown(value)}", expected
            )
        if not 1 <= value <= most:
            span = "exactly one datanode" if most == 1 else f"1 to {most} datanodes"
            raise Expected(f"this service type spans {span}, not {value}", expected)
        return value

    return validate


SBATCH_EXPECTED = "a command such as 'sbatch my_step.sh' or 'sbatch --wrap \"...\"'"


def sbatch_command(value: Any) -> str:
    """A Slurm batch submission that ``run`` will accept (checked by :func:`jobs.parse_sbatch`)."""
    if not isinstance(value, str) or not value.strip():
        raise Expected(f"expected a command, got {_shown(value)}", SBATCH_EXPECTED)
    try:
        parse_sbatch(value)
    except UsageError as exc:
        raise Expected(exc.message, SBATCH_EXPECTED) from None
    return value


def step_service_ref(value: Any) -> tuple[str, str]:
    """``"service [RO|RW]"`` -> (service, mode); the mode defaults to RW."""
    expected = f"'<service name>' or '<service name> RO|RW' (default {DEFAULT_ACCESS_MODE})"
    if not isinstance(value, str) or not value.split():
        raise Expected(f"expected a service name, got {_shown(value)}", expected)
    words = value.split()
    if len(words) > 2:
        raise Expected(f"too many words in {value!r}", expected)
    if len(words) == 2 and words[1] not in ACCESS_MODES:
        raise Expected(f"invalid access mode {words[1]!r}", one_of(ACCESS_MODES))
    name(words[0])
    return words[0], words[1] if len(words) == 2 else DEFAULT_ACCESS_MODE


def mapping(value: Any) -> dict:
    """A mapping (checked further by its own schema)."""
    if not isinstance(value, dict):
        raise Expected(f"expected a mapping, got {_shown(value)}", "keys and values, one per line")
    return value


def sequence(value: Any) -> list:
    """A list (its items are checked one by one by their own schema)."""
    if not isinstance(value, list):
        raise Expected(f"expected a list, got {_shown(value)}", "a list of '- ' entries")
    return value


def non_empty_sequence(value: Any) -> list:
    """A list with at least one item."""
    if not isinstance(value, list) or not value:
        raise Expected(f"expected a non-empty list, got {_shown(value)}", "at least one '- ' entry")
    return value


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


# ---- section schemas ---------------------------------------------------------------------------

TOP_LEVEL = vol.Schema(
    {
        vol.Required("workflow"): mapping,
        vol.Optional("services"): sequence,
        vol.Optional("datamovers"): sequence,
        vol.Required("steps"): non_empty_sequence,
    }
)

WORKFLOW = vol.Schema({vol.Required("name"): name})

SERVICE = vol.Schema(
    {
        vol.Required("name"): name,
        vol.Required("type"): text,
        vol.Required("attributes"): mapping,
        # The design note's form: data movers owned by the service (checked one by one).
        vol.Optional("datamovers"): sequence,
    }
)

DATAMOVER = vol.Schema(
    {
        vol.Required("name"): name,
        vol.Required("trigger"): choice(*TRIGGERS),
        vol.Required("target"): name,
        vol.Required("operation"): choice(*OPERATIONS),
        vol.Required("elements"): patterns,
    }
)

STEP = vol.Schema(
    {
        vol.Required("name"): name,
        vol.Optional("location"): names,
        vol.Required("command"): sbatch_command,
        vol.Optional("services"): sequence,
        # How the step's job sees its services, among those the site offers (default: the site's).
        vol.Optional("attach"): choice(*ATTACH_METHODS),
    }
)

STEP_SERVICE = vol.Schema({vol.Required("name"): step_service_ref, vol.Optional("datamovers"): name_list})

# The service types a WDF may use: type name -> schema of its `attributes`. Supporting a new type
# is adding its entry here (and a role that provisions it on the site).
SERVICE_TYPES: dict[str, vol.Schema] = {
    "NFS": vol.Schema(
        {
            vol.Required("namespace"): absolute_path,
            vol.Required("mountpoint"): mountpoint,
            vol.Optional("flavor"): name,
            vol.Optional("storagesize"): size,
            # One nfs-ganesha export on one datanode: an NFS service spans exactly one.
            vol.Optional("datanodes"): datanode_count(1),
            # IO-SEA WM v1.6 WDFs say where the service should run: a module name.
            vol.Optional("location"): name,
        }
    ),
}


def keys_of(schema: vol.Schema, *, required: bool = False) -> list[str]:
    """The keys a flat mapping schema accepts (only its required ones with ``required=True``)."""
    return [str(k) for k in schema.schema if not required or isinstance(k, vol.Required)]


def check(schema: vol.Schema, data: Any, path: Path, problems: Problems, what: str) -> dict | None:
    """``data`` validated by ``schema`` (a flat mapping schema), or None with its problems recorded."""
    if not isinstance(data, dict):
        problems.add(
            path, f"expected a mapping for {what}, got {_shown(data)}", "keys: " + ", ".join(keys_of(schema))
        )
        return None
    try:
        return schema(data)
    except vol.MultipleInvalid as exc:
        for error in exc.errors:
            _report(error, schema, path, problems)
    return None


# voluptuous reports an unknown key as a plain Invalid with this message (no subclass).
_EXTRA_KEYS = "extra keys not allowed"


def _report(error: vol.Invalid, schema: vol.Schema, base: Path, problems: Problems) -> None:
    if isinstance(error, vol.MultipleInvalid):
        for sub in error.errors:
            _report(sub, schema, base, problems)
        return
    # A missing key's path ends with its Required marker, not the key itself.
    path = (*base, *(p.schema if isinstance(p, vol.Marker) else p for p in error.path))
    key = path[-1] if len(path) > len(base) else None
    if isinstance(error, vol.RequiredFieldInvalid):
        # Placed at the key that holds the incomplete mapping (`attributes:`), when there is one.
        required = ", ".join(keys_of(schema, required=True))
        problems.add(
            path, f"missing required key {key!r}", f"the keys {required}", value=None, place=path[:-1]
        )
    elif type(error) is vol.Invalid and error.error_message == _EXTRA_KEYS:
        problems.add(path, f"unknown key {key!r}", one_of(keys_of(schema)), key=True, value=key)
    elif isinstance(error, Expected):
        problems.add(path, error.error_message, error.expected)
    else:
        problems.add(path, error.error_message)
