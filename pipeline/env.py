"""Defaults read from the environment: SPLITEXIT_ + a flag's name. Both the command line
(pipeline.options, for its flags' defaults and help) and the library (pipeline.edge, for the
broker's address when none is given) read them, so the rule lives below both."""

from __future__ import annotations

import os

__all__ = ["ENV_PREFIX", "env_name", "from_env"]

ENV_PREFIX = "SPLITEXIT_"   # --broker-secret's default is $SPLITEXIT_BROKER_SECRET, and so on


def from_env(flag: str, default=None):
    """An endpoint's or key's default: the environment (SPLITEXIT_ + the flag's name, upper
    case, dashes as underscores), else `default`; the help says which."""
    return os.environ.get(env_name(flag), default)


def env_name(flag: str) -> str:
    """The environment variable that holds `flag`'s default: --broker-secret ->
    SPLITEXIT_BROKER_SECRET."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
