"""Who is calling: the one place that identifies the user.

Today the user is the Unix user running the command. A later multi-user service will identify
users another way (submission on behalf of users, Keycloak): it changes this module only.
"""

from __future__ import annotations

import os
import pwd


def current_user() -> str:
    """The name of the Unix user running this process."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid{os.geteuid()}"
