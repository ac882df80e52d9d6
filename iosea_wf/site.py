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
WM_GROUP = "workflow_manager"

# How a job sees its services (iosea_service_attach): `bind` binds each namespace at its mountpoint
# in the job's private mount namespace, `nfs` mounts each service's export there through the
# user's FUSE NFS client (the job's I/O goes through the server), `env` only sets variables.
ATTACH_METHODS = ("bind", "nfs", "env")


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

    @property
    def attach(self) -> str:
        """The site's attach method for jobs (iosea_service_attach)."""
        return self.variables.get("iosea_service_attach", "env")

    @property
    def attach_methods(self) -> tuple[str, ...]:
        """Every attach method the site offers (iosea_service_attach_methods; its default first)."""
        offered = self.variables.get("iosea_service_attach_methods") or []
        return (self.attach, *[m for m in offered if m != self.attach])

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


@dataclass(frozen=True)
class Host:
    """A host of the inventory as a sysadmin's health check reaches it (``iosea-wf site check``).

    ``local``: ``ansible_connection: local`` (this machine: probed in-process, no SSH). Otherwise
    SSH with the inventory's standard variables (``ansible_host``, ``ansible_port``,
    ``ansible_user``, ``ansible_ssh_private_key_file``) and host keys checked against
    ``known_hosts``. ``settings`` holds what the roles use there (munge key and socket, the
    nfs-ganesha instance), the role defaults overridden by the inventory as Ansible would.
    """

    name: str
    groups: tuple[str, ...]
    local: bool
    address: str
    port: int
    user: str | None
    key_file: str | None
    known_hosts: tuple[str, ...]
    python: str
    become: bool = False
    connection: str = "ssh"
    settings: dict[str, Any] = field(default_factory=dict, compare=False)


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
        # The site has the privileged helpers of roles/privileged_helpers (iosea_wf/privileged.py).
        vol.Optional("iosea_privileged_helpers"): bool,
        vol.Optional("iosea_privileged_helpers_dir"): vol.All(str, vol.Match(r"^/")),
        vol.Optional("iosea_wm_account"): vol.All(str, vol.Match(r"^[a-z_][a-z0-9_-]{0,31}$")),
        vol.Optional("iosea_store_keep_days"): _non_negative_number,
        vol.Optional("iosea_service_attach", default="env"): vol.In(
            ATTACH_METHODS, msg=f"expected one of {', '.join(ATTACH_METHODS)}"
        ),
        vol.Optional("iosea_service_attach_methods"): vol.All(
            [vol.In(ATTACH_METHODS, msg=f"expected one of {', '.join(ATTACH_METHODS)}")],
            vol.Length(min=1, msg="list at least one method"),
        ),
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


def _read_inventory(
    path: Path, reach: bool = False
) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Read an inventory with Ansible itself: (templated group 'all' vars, groups, hostvars).

    ``reach``: each host's vars also hold ``_reach``: how to connect to it and what the roles use
    there (see :func:`_reach_vars`).
    """
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
        defaults = _role_defaults(loader) if reach else {}
        for host in inventory.get_hosts():
            raw = variables.get_vars(host=host, include_hostvars=False)
            hostvars[host.name] = Templar(loader=loader, variables=raw).template(
                {k: v for k, v in raw.items() if k.startswith(("iosea_", "slurm_", "nfs_"))}
            )
            if reach:
                in_groups = {g.name for g in host.get_groups()}
                hostvars[host.name]["_reach"] = _reach_vars(loader, defaults, raw, host.name, in_groups)
        some_host = inventory.get_hosts()[0] if inventory.get_hosts() else None
        raw_all = variables.get_vars(host=some_host, include_hostvars=False) if some_host else {}
        site_vars = Templar(loader=loader, variables=raw_all).template(
            {k: v for k, v in raw_all.items() if k.startswith("iosea_")}
        )
    except AnsibleError as exc:
        raise SiteError(f"cannot read the site inventory {path}: {exc.message}") from None
    return _plain(site_vars), groups, _plain(hostvars)


# The variables of a host a health check needs: Ansible's own connection variables, and the role
# settings it probes (their defaults are read from the roles themselves, so both sides agree).
_CONNECTION_VARS = (
    "ansible_connection",
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "ansible_ssh_private_key_file",
    "ansible_ssh_common_args",
    "ansible_ssh_extra_args",
    "ansible_python_interpreter",
    "ansible_become",
    "iosea_ssh_known_hosts",
)
_ROLE_SETTINGS = {
    "munge": ("munge_key_file", "munge_socket"),
    "nfs_ganesha": (
        "nfs_ganesha_instance_dir",
        "nfs_ganesha_address",
        "nfs_ganesha_port",
        "nfs_ganesha_mount_port",
    ),
}


def _role_defaults(loader: Any) -> dict[str, Any]:
    """The defaults of the roles whose settings a health check probes (lowest precedence, as in Ansible).

    Read with Ansible's loader: its data may be templated (ansible-core 2.19 templates only data
    from trusted sources).
    """
    from ansible.errors import AnsibleError

    found: dict[str, Any] = {}
    for role in _ROLE_SETTINGS:
        path = DATA_DIR / "roles" / role / "defaults" / "main.yml"
        try:
            try:
                data = loader.load_from_file(str(path), trusted_as_template=True)
            except TypeError:  # ansible-core before 2.19 templates whatever it loads
                data = loader.load_from_file(str(path))
            found.update(data or {})
        except AnsibleError as exc:
            raise SiteError(f"cannot read the defaults of role {role} ({path}): {exc.message}") from None
    return found


def _reach_vars(
    loader: Any, defaults: dict[str, Any], raw: dict[str, Any], host: str, groups: set[str]
) -> dict[str, Any]:
    """The connection variables and role settings of one host, each templated on its own.

    A variable that cannot be templated outside a play (``ansible_python_interpreter: "{{
    ansible_playbook_python }}"`` on the local site) counts as unset: the check does not need it.
    Role settings are those of the roles the host's groups run (nfs_ganesha: datanodes only).
    """
    from ansible.errors import AnsibleError
    from ansible.template import Templar

    wanted = [
        k
        for role, names in _ROLE_SETTINGS.items()
        if role != "nfs_ganesha" or DATANODES_GROUP in groups
        for k in names
    ]
    variables = {**defaults, **raw, "inventory_hostname": host}
    templar = Templar(loader=loader, variables=variables)
    found: dict[str, Any] = {}
    for key in (*_CONNECTION_VARS, *wanted):
        if key not in variables:
            continue
        try:
            found[key] = _plain(templar.template(variables[key]))
        except AnsibleError:
            found[key] = None
    return found


def _known_hosts(reach: dict[str, Any]) -> tuple[str, ...]:
    """A host's known-hosts files: iosea_ssh_known_hosts, else ssh's UserKnownHostsFile, else ssh's own."""
    if reach.get("iosea_ssh_known_hosts"):
        return (os.path.expanduser(str(reach["iosea_ssh_known_hosts"])),)
    import shlex

    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        words = shlex.split(str(reach.get(key) or ""))
        for i, word in enumerate(words):
            option = word[2:] if word.startswith("-o") and len(word) > 2 else None
            if word == "-o" and i + 1 < len(words):
                option = words[i + 1]
            if option and option.split("=", 1)[0].strip().lower() == "userknownhostsfile":
                return tuple(os.path.expanduser(p) for p in option.split("=", 1)[1].split())
    return (os.path.expanduser("~/.ssh/known_hosts"), "/etc/ssh/ssh_known_hosts")


def _host(name: str, groups: dict[str, list[str]], reach: dict[str, Any]) -> Host:
    """A :class:`Host` from its inventory variables; SiteError for a connection the check cannot make."""
    connection = str(reach.get("ansible_connection") or "ssh")
    if connection not in ("local", "ssh", "smart", "paramiko", "paramiko_ssh"):
        raise SiteError(
            f"host {name}: ansible_connection {connection!r} is not one `site check` can use (local or ssh)"
        )
    try:
        port = int(reach.get("ansible_port") or 22)
    except (TypeError, ValueError):
        raise SiteError(f"host {name}: ansible_port {reach.get('ansible_port')!r} is not a port") from None
    python = reach.get("ansible_python_interpreter")
    if not isinstance(python, str) or not python.startswith("/") or any(c.isspace() for c in python):
        python = "/usr/bin/python3"
    member = tuple(
        sorted(g for g, hosts in groups.items() if name in hosts and g not in ("all", "ungrouped"))
    )
    return Host(
        name=name,
        groups=member,
        local=connection == "local",
        address=str(reach.get("ansible_host") or name),
        port=port,
        user=str(reach["ansible_user"]) if reach.get("ansible_user") else None,
        key_file=os.path.expanduser(str(reach["ansible_ssh_private_key_file"]))
        if reach.get("ansible_ssh_private_key_file")
        else None,
        known_hosts=_known_hosts(reach),
        python=python,
        become=str(reach.get("ansible_become")).lower() in ("true", "yes", "1"),
        connection="local" if connection == "local" else "ssh",
        settings={k: reach[k] for names in _ROLE_SETTINGS.values() for k in names if k in reach},
    )


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


def _inventory_path(explicit: str | os.PathLike | None) -> Path:
    path = site_path(explicit)
    if not (path / "hosts.yml").is_file() and not (path / "hosts").is_file():
        raise SiteError(f"no site inventory at {path} (expected {path}/hosts.yml)")
    return path


def load_site(explicit: str | os.PathLike | None = None) -> Site:
    """Load and check the site inventory chosen by ``--site``/``IOSEA_WF_SITE`` (default: local)."""
    path = _inventory_path(explicit)
    return _site(path, *_read_inventory(path))


def load_site_hosts(
    explicit: str | os.PathLike | None = None,
) -> tuple[Site, dict[str, Host], dict[str, list[str]]]:
    """The site, every host of its inventory (how to reach it) and its groups, from one reading."""
    path = _inventory_path(explicit)
    site_vars, groups, hostvars = _read_inventory(path, reach=True)
    reach = {name: hv.pop("_reach", {}) for name, hv in hostvars.items()}
    site = _site(path, site_vars, groups, hostvars)
    hosts = {name: _host(name, groups, reach[name]) for name in groups.get("all", sorted(reach))}
    return site, hosts, groups


def _site(
    path: Path, site_vars: dict[str, Any], groups: dict[str, list[str]], hostvars: dict[str, dict[str, Any]]
) -> Site:
    """The site model of an inventory already read, checked."""
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

    def node_address(host: str) -> str:
        # A node is reached at iosea_node_address, else by its inventory name.
        return hostvars.get(host, {}).get("iosea_node_address") or host

    compute_hosts = groups.get(COMPUTE_GROUP, []) + [h for m in modules.values() for h in m.nodes]
    # The Workflow Manager lists each server's exports to see they are served (`status`): a host
    # the exports do not admit sees none of them and would call every service LOST.
    wm_addresses = [node_address(h) for h in groups.get(WM_GROUP, [])]
    clients = list(
        dict.fromkeys(
            [node_address(h) for h in compute_hosts]
            + [d.address for d in datanodes.values()]
            + ["127.0.0.1" if a == "localhost" else a for a in wm_addresses]
        )
    )
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
    offered = v.get("iosea_service_attach_methods")
    if offered is not None and v["iosea_service_attach"] not in offered:
        problems.append(
            f"iosea_service_attach {v['iosea_service_attach']!r} is not in iosea_service_attach_methods "
            f"({', '.join(offered)})"
        )
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
