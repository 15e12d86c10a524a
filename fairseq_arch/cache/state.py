"""``state.json`` (which generation is current, which one is being written) and
``owner.token`` (the lock of the job that opened the cache dir, with a fresh token of
its process group: :mod:`.lock`)."""

import os
from typing import Optional

from . import lock
from .files import DAMAGED, CacheCorruptError, atomic_write_json, read_json_dict

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


def holds_nothing(cache_dir: str) -> bool:
    """Whether the dir holds no perturbations at all: no generation in state.json nor on
    disk (a layout made by a start that stopped before its first refresh, or whose
    settings were refused). An unreadable state.json counts as holding something: its
    error is reported, not papered over."""
    if any(e.startswith("gen-") for e in os.listdir(cache_dir)):
        return False
    try:
        state = StateFile(cache_dir).read()
    except CacheCorruptError:
        return False
    return state.get("current") is None and state.get("in_progress") is None


class OwnerToken:
    """``owner.token``: rank 0 locks it (one job per cache dir) and writes its record;
    every rank reads the token back (the same dir on every node)."""

    def __init__(self, cache_dir: str):
        self.dir = cache_dir
        self.path = os.path.join(cache_dir, TOKEN_FILE)

    def stamp(self) -> str:
        """Take the dir for this job (CacheInUseError if another job holds it) and
        write a fresh token; returns it."""
        return lock.acquire(self.path, self.dir)

    def read(self) -> Optional[str]:
        held = lock.held_token(self.path)  # rank 0: through the fd it holds the lock by
        if held is not None:
            return held
        try:
            with open(self.path) as f:
                rec = lock.parse_record(f.read())
        except FileNotFoundError:
            return None
        return rec["token"] if rec else None
