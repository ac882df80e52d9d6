"""Where the site's Workflow Manager listens, read cheaply (no Ansible) from the environment or the site.

``IOSEA_WF_URL`` wins; else the site inventory's ``iosea_wm_url``, read as a literal from
``group_vars/all/*.yml`` (it must not be a template: the CLI reads it without Ansible, on every
command, and a site has one Workflow Manager).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import SiteError, UsageError

URL_KEY = "iosea_wm_url"
DEFAULT_SOCKET = "/run/iosea-wf/wm.sock"
DEFAULT_STATE_DIR = "/var/lib/iosea-wf/wm"


def site_literal(site: str | os.PathLike | None, key: str) -> str | None:
    """A literal string setting of the site's ``group_vars/all``, without reading the inventory."""
    from ..site import site_path  # not at import: with IOSEA_WF_URL set, no command needs the site model

    folder = site_path(site) / "group_vars" / "all"
    files = sorted(folder.glob("*.yml")) + sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if key not in text:
            continue
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SiteError(f"cannot read {path}: {exc}") from None
        value = data.get(key) if isinstance(data, dict) else None
        if value is None:
            continue
        if not isinstance(value, str) or "{{" in value or "{%" in value:
            raise SiteError(
                f"{path}: {key} must be a literal URL (e.g. unix://{DEFAULT_SOCKET}), got {value!r}"
            )
        return value.strip() or None
    return None


def configured_url(site: str | os.PathLike | None) -> str | None:
    """The Workflow Manager URL the CLI must use, or None to work in-process."""
    env = os.environ.get("IOSEA_WF_URL", "").strip()
    return env or site_literal(site, URL_KEY)


def parse_url(url: str) -> tuple[str | None, str]:
    """(Unix socket path or None, HTTP base URL) of ``unix:///PATH`` or ``http://HOST:PORT``."""
    parts = urlsplit(url)
    if parts.scheme == "unix" and parts.path and not parts.netloc:
        return parts.path, "http://iosea-wm"
    if parts.scheme == "http" and parts.hostname and parts.port:
        return None, f"http://{parts.netloc}"
    raise UsageError(f"a Workflow Manager URL is unix:///PATH or http://HOST:PORT, not {url!r}")


def default_socket(site: str | os.PathLike | None) -> Path:
    """The socket ``serve`` listens on by default: the site's unix:// URL, else the standard path."""
    url = site_literal(site, URL_KEY)
    if url:
        path, _ = parse_url(url)
        if path:
            return Path(path)
    return Path(DEFAULT_SOCKET)
