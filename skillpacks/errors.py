"""PackError: a pack that is malformed, corrupt, or does not fit its base.

Its own module because both the format (skillpacks/format.py) and the base check
(skillpacks/fingerprint.py) raise it, and the format calls the base check.
"""
from __future__ import annotations


class PackError(ValueError):
    """A pack that is malformed, corrupt, or does not fit the base it is used with."""
