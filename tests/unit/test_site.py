"""Site inventories: both shipped sites load, offer the same names, and mistakes are reported."""

from __future__ import annotations

import shutil

import pytest
import yaml

from iosea_wf.errors import SiteError
from iosea_wf.site import load_site


def test_local_and_example_offer_the_same_names():
    local, example = load_site("inventories/local"), load_site("inventories/example")
    assert set(local.modules) == set(example.modules) == {"cpu_module", "gpu_module"}
    assert set(local.flavors) == set(example.flavors) == {"small", "medium", "high", "max"}
    assert set(local.tiers) == set(example.tiers) == {"flash", "disk", "tape"}
    assert len(example.datanodes) == 4
    assert example.flavors["medium"].cores == 4 and example.flavors["medium"].memory_mb == 10000
    assert example.modules["cpu_module"].nodes[0] == "cpu001.example.org"
    assert len(example.modules["cpu_module"].nodes) == 128


def test_default_site_is_local(monkeypatch):
    monkeypatch.delenv("IOSEA_WF_SITE", raising=False)
    assert load_site().path.name == "local"


def test_templated_tier_path_is_resolved():
    local = load_site("inventories/local")
    assert local.tiers["flash"].path == local.root + "/tiers/flash"


@pytest.fixture
def site_copy(tmp_path):
    dst = tmp_path / "site"
    shutil.copytree("inventories/local", dst)
    return dst


def _edit(site, change):
    path = site / "group_vars" / "all" / "iosea.yml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_unknown_default_flavor_is_reported(site_copy):
    _edit(site_copy, lambda d: d.update(iosea_default_flavor="huge"))
    with pytest.raises(SiteError) as exc:
        load_site(site_copy)
    assert "iosea_default_flavor 'huge' is not a flavor" in str(exc.value)


def test_tier_with_unknown_tool_is_reported(site_copy):
    _edit(site_copy, lambda d: d["iosea_tiers"]["tape"].update(tool="nope"))
    with pytest.raises(SiteError) as exc:
        load_site(site_copy)
    assert "tier 'tape' uses unknown data-mover tool 'nope'" in str(exc.value)


def test_bad_flavor_value_is_reported(site_copy):
    _edit(site_copy, lambda d: d["iosea_flavors"]["small"].update(cores="two"))
    with pytest.raises(SiteError) as exc:
        load_site(site_copy)
    assert "iosea_flavors.small.cores" in str(exc.value)


def test_added_module_appears(site_copy):
    hosts = yaml.safe_load((site_copy / "hosts.yml").read_text())
    hosts["all"]["children"]["compute"]["children"]["bigmem_module"] = {
        "hosts": {"bigmem1": {"slurm_node_port": 17201}}
    }
    (site_copy / "hosts.yml").write_text(yaml.safe_dump(hosts))
    _edit(site_copy, lambda d: d["iosea_modules"].update(bigmem_module={"partition": "bigmem"}))
    site = load_site(site_copy)
    assert site.modules["bigmem_module"].nodes == ("bigmem1",)


@pytest.mark.parametrize("path", ["inventories/local", "inventories/example"])
def test_snapshot_round_trip(path):
    import json

    from iosea_wf.site import Site

    site = load_site(path)
    again = Site.from_dict(json.loads(json.dumps(site.to_dict())))
    assert again == site
    assert again.variables == site.variables
    assert (
        again.datanodes[next(iter(site.datanodes))].hostvars
        == site.datanodes[next(iter(site.datanodes))].hostvars
    )


def test_local_site_offers_nfs_beside_its_bind_default():
    local = load_site("inventories/local")
    assert local.attach == "bind"
    assert local.attach_methods == ("bind", "nfs", "env")


@pytest.mark.parametrize("value", ["nfs4", "", 3, ["nfs"]])
def test_unknown_attach_method_is_refused_at_load(site_copy, value):
    _edit(site_copy, lambda d: d.update(iosea_service_attach=value))
    with pytest.raises(SiteError) as exc:
        load_site(site_copy)
    assert "iosea_service_attach: expected one of bind, nfs, env" in "\n".join(exc.value.details)


def test_offered_attach_methods_are_checked(site_copy):
    _edit(site_copy, lambda d: d.update(iosea_service_attach_methods=["bind", "9p"]))
    with pytest.raises(SiteError) as exc:
        load_site(site_copy)
    assert "iosea_service_attach_methods.1: expected one of bind, nfs, env" in "\n".join(exc.value.details)


def test_attach_default_must_be_offered(site_copy):
    _edit(site_copy, lambda d: d.update(iosea_service_attach="nfs", iosea_service_attach_methods=["bind"]))
    with pytest.raises(SiteError) as exc:
        load_site(site_copy)
    assert "iosea_service_attach 'nfs' is not in iosea_service_attach_methods (bind)" in "\n".join(
        exc.value.details
    )


def test_a_site_without_attach_settings_attaches_by_env(site_copy):
    _edit(site_copy, lambda d: [d.pop("iosea_service_attach"), d.pop("iosea_service_attach_methods")])
    site = load_site(site_copy)
    assert (site.attach, site.attach_methods) == ("env", ("env",))


def test_a_run_is_refused_a_method_its_site_snapshot_does_not_offer():
    from types import SimpleNamespace

    from iosea_wf.steps import attach_method

    data = load_site("inventories/local").to_dict()
    data["variables"]["iosea_service_attach_methods"] = ["bind"]
    site = type(load_site("inventories/local")).from_dict(data)
    assert attach_method(site, SimpleNamespace(name="s", attach=None)) == "bind"
    with pytest.raises(SiteError) as exc:
        attach_method(site, SimpleNamespace(name="s", attach="nfs"))
    assert "step s: attach method 'nfs' is not offered by the site (offered: bind)" in str(exc.value)
