"""The extra vars file the orchestrator writes: every string tagged !unsafe, values read back exactly."""

from __future__ import annotations

from collections import OrderedDict

import yaml

from iosea_wf.orchestrator import untrusted_extravars


class _Tagged(str):
    """A str subclass, as values read from the inventory or the store may be."""


class _UnsafeLoader(yaml.SafeLoader):
    """Reads !unsafe as Ansible does for data: the plain string, remembered as untrusted."""


UNSAFE: list[str] = []


def _construct_unsafe(loader, node):
    value = loader.construct_scalar(node)
    UNSAFE.append(value)
    return value


_UnsafeLoader.add_constructor("!unsafe", _construct_unsafe)


def test_every_string_is_unsafe_and_reads_back_exactly():
    data = {
        "iosea_action": "start",
        "iosea_services": [
            OrderedDict(
                name=_Tagged("svc1"),
                namespace="/tmp/x{{ lookup('pipe', 'id') }}\n:\"'`",
                export_id=4242,
                ok=True,
                nothing=None,
                ratio=0.5,
                movers=("a", "{% raw %}"),
            )
        ],
    }
    UNSAFE.clear()
    text = untrusted_extravars(data)
    back = yaml.load(text, Loader=_UnsafeLoader)  # noqa: S506 (a SafeLoader subclass)
    assert back == {
        "iosea_action": "start",
        "iosea_services": [
            {
                "name": "svc1",
                "namespace": "/tmp/x{{ lookup('pipe', 'id') }}\n:\"'`",
                "export_id": 4242,
                "ok": True,
                "nothing": None,
                "ratio": 0.5,
                "movers": ["a", "{% raw %}"],
            }
        ],
    }
    # Every string value is tagged; keys (our variable and field names) are not.
    assert sorted(UNSAFE) == sorted(
        ["start", "svc1", "/tmp/x{{ lookup('pipe', 'id') }}\n:\"'`", "a", "{% raw %}"]
    )
    assert '!unsafe "iosea_action"' not in text
