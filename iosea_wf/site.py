"""The site model: modules, datanodes, flavors, storage tiers and data-mover tools.

A site is an Ansible inventory directory (``hosts.yml`` plus ``group_vars``/``host_vars``) that a
sysadmin edits. It is read here with Ansible's own inventory and variable managers, so a value
means exactly the same to the Python side as to the playbooks that receive the same inventory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import voluptuous as vol

from .errors import SiteError

# playbooks/, roles/ and inventories/ live at the top of the repository and ship inside the package
# as iosea_wf/_data/ (symlinks in the checkout, copies in a wheel), so an editable install and a
# wheel find them the same way and neither needs the checkout at run time.
DATA_DIR = Path(str(files("iosea_wf") / "_data"))
LOCAL_SITE = DATA_DIR / "inventories" / "local"

# Group names the inventory must use (named after what runs there, as in stackhpc's appliance).
DATANODES_GROUP = "datanodes"
COMPUTE_GROUP = "compute"


@dataclass(frozen=True)
class Module:
    """A compute module: its Slurm partition and its compute nodes."""

    name: str
    partition: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Flavor:
    """Resources an ephemeral service reserves on a datanode."""

    name: str
    cores: int
    memory_mb: int
    storage_gb: int


@dataclass(frozen=True)
class Datanode:
    """A host that runs ephemeral I/O services, with its capacity and the modules it serves."""

    name: str
    address: str
    cores: int
    memory_mb: int
    storage_gb: int
    modules: tuple[str, ...]
    hostvars: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Tier:
    """A storage tier a data mover can target."""

    name: str
    path: str
    tool: str


@dataclass(frozen=True)
class MoverTool:
    """A data-mover tool: the argument list to run (the mover's arguments are appended)."""

    name: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class Site:
    """Everything a site offers to workflows, as read from its inventory."""

    path: Path
    modules: dict[str, Module]
    datanodes: dict[str, Datanode]
    flavors: dict[str, Flavor]
    tiers: dict[str, Tier]
    mover_tools: dict[str, MoverTool]
    service_types: dict[str, dict[str, Any]]
    default_flavor: str
    default_module: str
    interactive_partition: str
    datanodes_partition: str
    root: str
    # Resolved absolute directories a dataset namespace must lie below (iosea_namespace_roots).
    namespace_roots: tuple[str, ...] = ()
    # Addresses of every compute node and datanode: the only NFS clients an export admits.
    nfs_clients: tuple[str, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def store_keep_days(self) -> float:
        """Days an ended session stays in the live store before it is archived (iosea_store_keep_days)."""
        from .store import DEFAULT_KEEP_DAYS

        return self.variables.get("iosea_store_keep_days", DEFAULT_KEEP_DAYS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (a session keeps the site it was started on)."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        """Rebuild a site from :meth:`to_dict` without reading the inventory again."""
        d = dict(data)
        d["path"] = Path(d["path"])
        d["modules"] = {
            k: Module(v["name"], v["partition"], tuple(v["nodes"])) for k, v in d["modules"].items()
        }
        d["datanodes"] = {
            k: Datanode(**{**v, "modules": tuple(v["modules"])}) for k, v in d["datanodes"].items()
        }
        d["flavors"] = {k: Flavor(**v) for k, v in d["flavors"].items()}
        d["tiers"] = {k: Tier(**v) for k, v in d["tiers"].items()}
        d["mover_tools"] = {k: MoverTool(v["name"], tuple(v["command"])) for k, v in d["mover_tools"].items()}
        # Snapshots taken before namespace roots existed have none: such a session is already running.
        d["namespace_roots"] = tuple(d.get("namespace_roots", ()))
        d["nfs_clients"] = tuple(d.get("nfs_clients", ()))
        return cls(**d)

    def describe(self, what: str) -> list[dict[str, Any]]:
        """Rows for ``iosea-wf show locations|flavors|tiers``: a list of objects with ``name``."""
        if what == "locations":
            return [
                {
                    "name": m.name,
                    "partition": m.partition,
                    "nodes": list(m.nodes),
                    "default": m.name == self.default_module,
                    "datanodes": [d.name for d in self.datanodes.values() if m.name in d.modules],
                }
                for m in self.modules.values()
            ]
        if what == "flavors":
            return [
                {
                    "name": f.name,
                    "cores": f.cores,
                    "memory_mb": f.memory_mb,
                    "storage_gb": f.storage_gb,
                    "default": f.name == self.default_flavor,
                }
                for f in self.flavors.values()
            ]
        if what == "tiers":
            return [{"name": t.name, "path": t.path, "tool": t.tool} for t in self.tiers.values()]
        raise SiteError(f"unknown site listing {what!r}: expected locations, flavors or tiers")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise vol.Invalid(f"expected a non-negative whole number, got {value!r}")
    return value


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise vol.Invalid(f"expected a non-negative number of days, got {value!r}")
    return value


# What an NFS server may be told is a client: an address, a host name or a CIDR network.
_CLIENT = re.compile(r"^[A-Za-z0-9_.:*?-]+(/[0-9]{1,3})?$")

_NAME = vol.All(str, vol.Match(r"^[A-Za-z0-9_.-]+$", msg="expected a name of letters, digits, _ . -"))

_SITE_VARS = vol.Schema(
    {
        vol.Required("iosea_site_root"): str,
        vol.Required("iosea_modules"): vol.All(
            {_NAME: {vol.Required("partition"): _NAME}}, vol.Length(min=1)
        ),
        vol.Required("iosea_default_module"): str,
        vol.Required("iosea_datanodes_partition"): _NAME,
        vol.Required("iosea_interactive_partition"): _NAME,
        vol.Required("iosea_flavors"): vol.All(
            {
                _NAME: {
                    vol.Required("cores"): _positive_int,
                    vol.Required("memory_mb"): _positive_int,
                    vol.Required("storage_gb"): _positive_int,
                }
            },
            vol.Length(min=1),
        ),
        vol.Required("iosea_default_flavor"): str,
        vol.Required("iosea_service_types"): vol.All({str: {vol.Required("role"): _NAME}}, vol.Length(min=1)),
        vol.Required("iosea_tiers"): vol.All(
            {_NAME: {vol.Required("path"): str, vol.Required("tool"): _NAME}}, vol.Length(min=1)
        ),
        vol.Required("iosea_datamover_tools"): {
            _NAME: {vol.Required("command"): vol.All([str], vol.Length(min=1))}
        },
        vol.Required(
            "iosea_namespace_roots",
            msg="required: the directories dataset namespaces may live in (e.g. [/home, /scratch])",
        ): vol.All([str], vol.Length(min=1, msg="list at least one directory")),
        vol.Optional("iosea_nfs_clients"): vol.All([str], vol.Length(min=1)),
        vol.Optional("iosea_store_keep_days"): _non_negative_number,
    },
    extra=vol.ALLOW_EXTRA,
)

_DATANODE_VARS = vol.Schema(
    {
        vol.Required("iosea_datanode_address"): str,
        vol.Required("iosea_datanode_cores"): _positive_int,
        vol.Required("iosea_datanode_memory_mb"): _positive_int,
        vol.Required("iosea_datanode_storage_gb"): _positive_int,
        vol.Required("iosea_datanode_modules"): vol.All([str], vol.Length(min=1)),
    },
    extra=vol.ALLOW_EXTRA,
)


def site_path(explicit: str | os.PathLike | None = None) -> Path:
    """The inventory directory to use: ``--site``, else ``IOSEA_WF_SITE``, else the local site."""
    chosen = explicit or os.environ.get("IOSEA_WF_SITE") or LOCAL_SITE
    return Path(chosen).expanduser().resolve()


def _read_inventory(path: Path) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Read an inventory with Ansible itself: (templated group 'all' vars, groups, hostvars)."""
    # Imported here: read-only commands that need no site (status, list) never pay for Ansible.
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    try:
        loader = DataLoader()
        inventory = InventoryManager(loader=loader, sources=[str(path)])
        variables = VariableManager(loader=loader, inventory=inventory)
        groups = {name: [h.name for h in g.get_hosts()] for name, g in inventory.groups.items()}
        hostvars = {}
        for host in inventory.get_hosts():
            raw = variables.get_vars(host=host, include_hostvars=False)
            hostvars[host.name] = Templar(loader=loader, variables=raw).template(
                {k: v for k, v in raw.items() if k.startswith(("iosea_", "slurm_", "nfs_"))}
            )
        some_host = inventory.get_hosts()[0] if inventory.get_hosts() else None
        raw_all = variables.get_vars(host=some_host, include_hostvars=False) if some_host else {}
        site_vars = Templar(loader=loader, variables=raw_all).template(
            {k: v for k, v in raw_all.items() if k.startswith("iosea_")}
        )
    except AnsibleError as exc:
        raise SiteError(f"cannot read the site inventory {path}: {exc.message}") from None
    return _plain(site_vars), groups, _plain(hostvars)


def _plain(value: Any) -> Any:
    """Copy Ansible's tagged containers and strings into plain Python types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def _check(schema: vol.Schema, data: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return schema(data)
    except vol.MultipleInvalid as exc:
        problems = [f"{where}: {'.'.join(str(p) for p in e.path) or '(top)'}: {e.msg}" for e in exc.errors]
        raise SiteError("the site inventory is invalid", details=problems) from None


def load_site(explicit: str | os.PathLike | None = None) -> Site:
    """Load and check the site inventory chosen by ``--site``/``IOSEA_WF_SITE`` (default: local)."""
    path = site_path(explicit)
    if not (path / "hosts.yml").is_file() and not (path / "hosts").is_file():
        raise SiteError(f"no site inventory at {path} (expected {path}/hosts.yml)")
    site_vars, groups, hostvars = _read_inventory(path)
    v = _check(_SITE_VARS, site_vars, f"{path}/group_vars")
    problems: list[str] = []

    modules = {}
    for name, spec in v["iosea_modules"].items():
        nodes = tuple(groups.get(name, []))
        if not nodes:
            problems.append(
                f"module {name!r} has no compute nodes (add hosts to the inventory group {name!r})"
            )
        modules[name] = Module(name=name, partition=spec["partition"], nodes=nodes)

    datanodes = {}
    for host in groups.get(DATANODES_GROUP, []):
        hv = _check(_DATANODE_VARS, hostvars.get(host, {}), f"datanode {host}")
        unknown = [m for m in hv["iosea_datanode_modules"] if m not in modules]
        if unknown:
            problems.append(f"datanode {host} serves unknown module(s) {', '.join(unknown)}")
        datanodes[host] = Datanode(
            name=host,
            address=hv["iosea_datanode_address"],
            cores=hv["iosea_datanode_cores"],
            memory_mb=hv["iosea_datanode_memory_mb"],
            storage_gb=hv["iosea_datanode_storage_gb"],
            modules=tuple(hv["iosea_datanode_modules"]),
            hostvars=hostvars.get(host, {}),
        )
    if not datanodes:
        problems.append(f"the inventory group {DATANODES_GROUP!r} has no hosts")

    flavors = {n: Flavor(name=n, **spec) for n, spec in v["iosea_flavors"].items()}
    tools = {
        n: MoverTool(name=n, command=tuple(spec["command"])) for n, spec in v["iosea_datamover_tools"].items()
    }
    tiers = {}
    for name, spec in v["iosea_tiers"].items():
        if spec["tool"] not in tools:
            problems.append(f"tier {name!r} uses unknown data-mover tool {spec['tool']!r}")
        if not os.path.isabs(spec["path"]):
            problems.append(f"tier {name!r} path must be absolute, got {spec['path']!r}")
        tiers[name] = Tier(name=name, path=spec["path"], tool=spec["tool"])
    clients: list[str] = []
    compute_hosts = groups.get(COMPUTE_GROUP, []) + [h for m in modules.values() for h in m.nodes]
    for host in compute_hosts:
        # A compute node is reached at iosea_node_address, else by its inventory name.
        address = hostvars.get(host, {}).get("iosea_node_address") or host
        if address not in clients:
            clients.append(address)
    for datanode in datanodes.values():
        if datanode.address not in clients:
            clients.append(datanode.address)
    if "iosea_nfs_clients" in v:
        # A site may name its networks instead (e.g. [10.20.0.0/16]): fewer entries, same rule.
        clients = list(v["iosea_nfs_clients"])
    for address in clients:
        if not isinstance(address, str) or not _CLIENT.match(address):
            problems.append(f"node address {address!r} is not an address, host name or CIDR network")
    roots = []
    for root in v["iosea_namespace_roots"]:
        resolved = os.path.realpath(root)
        if not os.path.isabs(root):
            problems.append(f"iosea_namespace_roots: {root!r} must be an absolute path")
        elif resolved == "/":
            problems.append(
                f"iosea_namespace_roots: {root!r} is the whole file system; list directories below /"
            )
        elif resolved not in roots:
            roots.append(resolved)
    if v["iosea_default_flavor"] not in flavors:
        problems.append(f"iosea_default_flavor {v['iosea_default_flavor']!r} is not a flavor")
    if v["iosea_default_module"] not in modules:
        problems.append(f"iosea_default_module {v['iosea_default_module']!r} is not a module")
    if problems:
        raise SiteError(f"the site inventory {path} is inconsistent", details=problems)

    return Site(
        path=path,
        modules=modules,
        datanodes=datanodes,
        flavors=flavors,
        tiers=tiers,
        mover_tools=tools,
        service_types=v["iosea_service_types"],
        default_flavor=v["iosea_default_flavor"],
        default_module=v["iosea_default_module"],
        interactive_partition=v["iosea_interactive_partition"],
        datanodes_partition=v["iosea_datanodes_partition"],
        root=v["iosea_site_root"],
        namespace_roots=tuple(roots),
        nfs_clients=tuple(clients),
        variables=v,
    )
