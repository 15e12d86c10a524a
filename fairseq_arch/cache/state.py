"""``state.json`` (which generation is current, which one is being written) and
``owner.token`` (a fresh token of the process group that opened the cache dir)."""

import os
import uuid
from typing import Optional

from .files import DAMAGED, CacheCorruptError, atomic_write_json, atomic_write_text, read_json_dict

STATE_FILE = "state.json"
TOKEN_FILE = "owner.token"
EMPTY_STATE = {"current": None, "in_progress": None}


def check_state(path: str, state: dict) -> dict:
    """state.json: {"current": None | {name, epoch}, "in_progress": None | {name, epoch, base}}."""
    def bad(why):
        return CacheCorruptError(f"{path} is invalid ({why}): {DAMAGED}")

    for key, fields in (("current", ("name", "epoch")), ("in_progress", ("name", "epoch", "base"))):
        if key not in state:
            raise bad(f"no {key!r} entry")
        entry = state[key]
        if entry is None:
            continue
        if not isinstance(entry, dict) or any(f not in entry for f in fields):
            raise bad(f"{key!r} must be null or an object with {list(fields)}, got {entry!r}")
        if not isinstance(entry["name"], str) or not entry["name"].startswith("gen-") \
                or type(entry["epoch"]) is not int or entry["epoch"] < 1:
            raise bad(f"{key!r} must name a generation gen-* and a positive integer epoch, got {entry!r}")
        if key == "in_progress" and not (entry["base"] is None or isinstance(entry["base"], str)):
            raise bad(f"'in_progress' base must be null or a generation name, got {entry['base']!r}")
    return state


class StateFile:
    def __init__(self, cache_dir: str):
        self.path = os.path.join(cache_dir, STATE_FILE)

    def read(self) -> dict:
        return check_state(self.path, read_json_dict(self.path))

    def write(self, state: dict) -> None:
        atomic_write_json(self.path, state)


class OwnerToken:
    def __init__(self, cache_dir: str):
        self.path = os.path.join(cache_dir, TOKEN_FILE)

    def stamp(self) -> str:
        """A fresh token, written; returned."""
        token = uuid.uuid4().hex
        atomic_write_text(self.path, token)
        return token

    def read(self) -> Optional[str]:
        try:
            with open(self.path) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None
