"""A site's privacy ledger: every Gaussian release ever made from one data set, in one file.

The ledger is keyed to the site's data (a hash of its identity), lives in a folder the site's node
config names (never a run's folder), and so survives new runs, wiped state folders and new
coordinators. Only an explicit command resets it:
    python -m grata.ledger show  FOLDER
    python -m grata.ledger reset FOLDER --key KEY --yes
Each entry is one release: (noise multiplier = noise std / sensitivity, sample rate 1, 1 step). The
epsilon spent is the composition of all entries under Opacus's accountant (RDP by default).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from opacus.accountants import create_accountant


def data_key(identity: dict) -> str:
    """A stable name for a data set: sha256 of its identity (kind, root, domain, site), 24 hex digits."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, created with mode 0600 (never readable by others, not even
    for an instant): a temporary file in the same folder, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Ledger:
    """One data set's releases. folder: the site's ledger folder; key: data_key(identity)."""

    def __init__(self, folder: str | Path, key: str, accountant: str = "rdp") -> None:
        self.path = Path(folder) / f"{key}.json"
        self.key, self.accountant = key, accountant
        self.history: list[tuple[float, float, int]] = []
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.history = [tuple(h) for h in raw["history"]]
            except (OSError, ValueError, KeyError) as exc:
                raise RuntimeError(f"privacy ledger {self.path} is unreadable ({exc}); refusing to release "
                                   "anything until it is repaired or reset with `python -m grata.ledger reset`") from exc

    def _epsilon(self, history: list, delta: float) -> float:
        if not history:
            return 0.0
        acc = create_accountant(self.accountant)
        acc.history = list(history)
        return float(acc.get_epsilon(delta))

    def spent(self, delta: float) -> float:
        return self._epsilon(self.history, delta)

    def would_spend(self, multipliers: list[float], delta: float) -> float:
        return self._epsilon(self.history + [(m, 1.0, 1) for m in multipliers], delta)

    def record(self, multipliers: list[float]) -> None:
        """Account releases and persist before anything is sent (a crash after this over-counts, never under)."""
        self.history += [(float(m), 1.0, 1) for m in multipliers]
        write_private(self.path, json.dumps({"key": self.key, "accountant": self.accountant,
                                             "history": self.history}).encode())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Show or reset a site's privacy ledger")
    parser.add_argument("command", choices=["show", "reset"])
    parser.add_argument("folder")
    parser.add_argument("--key", help="reset: the ledger to reset (its file name without .json)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--yes", action="store_true", help="reset: confirm")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.command == "show":
        for path in sorted(folder.glob("*.json")):
            ledger = Ledger(folder, path.stem)
            print(f"{path.stem}: {len(ledger.history)} releases, epsilon {ledger.spent(args.delta):.4f} at delta {args.delta:g}")
        return 0
    if not args.key or not args.yes:
        parser.error("reset needs --key KEY and --yes: it forgets every release made from that data")
    (folder / f"{args.key}.json").unlink(missing_ok=True)
    print(f"ledger {args.key} reset")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
