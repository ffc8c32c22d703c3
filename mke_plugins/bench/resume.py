"""Runs that survive: each finished unit of work appended to a JSONL beside ``--json``, and ``--resume``.

Why it exists: a 1,000-case run at 7B takes days and gets killed. Each rank appends every unit it
finishes (single mode: one case, every method's scores; sequential mode: one method's whole
sequence, its cases and checkpoints) to its own ``<json>.rank<R>.jsonl``, flushed and fsynced, so a
killed run loses at most the units in flight. The first line of each file is a header holding the
run's :func:`fingerprint` (data, model, methods and their hyperparameters, mode, seed, ...).
``--resume`` reads every rank's file (any number of ranks, from any earlier launch), refuses one
written by a different run naming each difference, and hands back the units already done; the
run then does only the rest, and rank 0 merges both into the final JSON. Without ``--resume`` an
earlier run's files are removed before the first unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from mke_hooks import MKEError

from .dist import Ranks

#: the header's ``journal`` value and format version
JOURNAL = "mke-plugins bench"
VERSION = 1


def rank_path(json_path: str | Path, rank: int) -> Path:
    """The JSONL of ``rank`` beside the result JSON: ``bench-results.json.rank0.jsonl``."""
    return Path(f"{json_path}.rank{rank}.jsonl")


def journal_paths(json_path: str | Path) -> list[Path]:
    """Every rank's JSONL beside ``json_path`` that exists, in rank order."""
    path = Path(json_path)
    pattern = re.compile(re.escape(path.name) + r"\.rank(\d+)\.jsonl$")
    if not path.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def unit_key(record: dict[str, Any]) -> str:
    """The identity of a unit: ``case:<index>`` or ``sequence:<method>:<first case index>``."""
    if record.get("unit") == "case":
        return f"case:{record['index']}"
    return f"sequence:{record['method']}:{record['start']}"


def _digest_default(obj: Any) -> str:
    """A stable stand-in for a value JSON cannot hold (a picture: a hash of its pixels)."""
    if hasattr(obj, "tobytes"):
        return hashlib.sha256(obj.tobytes()).hexdigest()
    if hasattr(obj, "numpy"):
        return hashlib.sha256(obj.detach().cpu().numpy().tobytes()).hexdigest()
    return type(obj).__name__


def data_digest(records: Iterable[Any]) -> str:
    """A hash of the benchmark records (texts, targets, probe lists, image paths or pixels)."""
    text = json.dumps(list(records), sort_keys=True, default=_digest_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints, one readable item per difference."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            for label in [k for k in b if k in a]:
                changed = sorted(k for k in set(a[label]) | set(b[label]) if a[label].get(k) != b[label].get(k))
                out.extend(f"{label} hparams {k}: {a[label].get(k)!r} -> {b[label].get(k)!r}" for k in changed)
            continue  # a method added or removed shows under "methods"
        out.append(f"{key}: {a!r} -> {b!r}")
    return out


class Journal:
    """This rank's JSONL of finished units, and the units every rank's JSONL already holds."""

    def __init__(self, json_path: str | Path, ranks: Ranks, fingerprint: dict[str, Any], resume: bool) -> None:
        self.json_path = str(json_path)
        self.ranks = ranks
        self.fingerprint = fingerprint
        self.resume = resume
        self.path = rank_path(json_path, ranks.rank)
        self._file: Any = None
        self.discarded = 0  # units of an earlier run removed by a run without resume (rank 0)

    def open(self) -> dict[str, dict[str, Any]]:
        """Start this rank's file; with ``resume``, the units already done (by key), else ``{}``.

        Every rank reads every file before any rank writes (a barrier between), so all ranks agree
        on what is left; a file of another run is refused on every rank alike.
        """
        done: dict[str, dict[str, Any]] = {}
        if self.resume:
            for path in journal_paths(self.json_path):
                done.update(self._read(path))
        elif self.ranks.main:
            for path in journal_paths(self.json_path):
                self.discarded += max(0, sum(1 for line in path.read_text(encoding="utf-8").splitlines()
                                             if line.strip()) - 1)
                path.unlink()
        self.ranks.barrier()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume and self.path.exists() and self.path.stat().st_size > 0:
            _drop_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")
            self._write({"journal": JOURNAL, "version": VERSION, "rank": self.ranks.rank,
                         "world_size": self.ranks.size, "fingerprint": self.fingerprint})
        return done

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        lines = path.read_text(encoding="utf-8").split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("journal") != JOURNAL:
            raise MKEError(f"--resume: {path} is not a bench journal (no header line); remove it or rerun without "
                           "--resume to start over")
        if header.get("version") != VERSION:
            raise MKEError(f"--resume: {path} has journal version {header.get('version')}, this bench writes "
                           f"{VERSION}; rerun without --resume to start over")
        diff = differences(header.get("fingerprint") or {}, self.fingerprint)
        if diff:
            raise MKEError(f"--resume: {path} was written by a different run ({'; '.join(diff)}); run with the same "
                           "data, model, methods and hparams as before, or drop --resume (or choose another --json) "
                           "to start over")
        done = {}
        body = lines[1:]
        for k, line in enumerate(body):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if k == len(body) - 1 or not any(rest.strip() for rest in body[k + 1:]):
                    continue  # the unit in flight when the run was killed: done again
                raise MKEError(f"--resume: {path} line {k + 2} is not JSON; remove the file (its units run "
                               "again) or rerun without --resume") from None
            done[unit_key(record)] = record
        return done

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """One finished unit, on disk before the next starts."""
        self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done: a finished unit is journaled and counted, or
    neither, so an interrupted run reports exactly the units its journal holds.

    The SIGINT handler is swapped for one that only notes the signal, and the old handler runs after
    the block. (Masking the signal is not enough: the kernel then hands it to another thread, such
    as tqdm's monitor or a torch worker, and Python still raises in the main thread, mid-block.)
    Off the main thread, where handlers cannot be set, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[Any] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if held:  # a Ctrl-C came during the block: it takes effect now, as the old handler says
            if callable(old):
                old(signal.SIGINT, held[0])
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line the kill left half-written, so the next unit starts on a line of its own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
