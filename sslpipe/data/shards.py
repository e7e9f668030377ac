"""data_prep on several nodes: each node's shard of the id list, by a stable hash of the id,
and where the node writes its parts (see :mod:`sslpipe.steps.data_prep`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROGRESS_FILE = ".progress.jsonl"
"""The journal of the images a run has finished, in the output folder until the run ends."""


def shard_of(image_id: str, count: int) -> int:
    """The shard of ``image_id`` among ``count``: its SHA-256, read as a number, modulo count.

    The same on every machine and in every run (unlike ``hash``), and balanced: of n ids each
    shard gets n / count, give or take a few times sqrt(n / count).
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """This node's share of the id list: the ids of :func:`shard_of` ``rank`` of ``count``.

    ``run`` names the run (the same on every node of it), so that the parts of this run are
    told from those an earlier run left in the output folder. One node: the whole list.
    """

    rank: int = 0
    count: int = 1
    run: str = ""

    def part(self, output_dir: Path, kind: str, rank: int | None = None) -> Path:
        """The part file ``kind`` (manifest, skipped, stats) of this node or of ``rank``."""
        number = self.rank if rank is None else rank
        suffix = "json" if kind == "stats" else "csv"
        return output_dir / "parts" / f"{kind}-{number:05d}-of-{self.count:05d}.{suffix}"

    def journal(self, output_dir: Path) -> Path:
        """This node's progress journal (:data:`PROGRESS_FILE`; one per node on several)."""
        if self.count == 1:
            return output_dir / PROGRESS_FILE
        return output_dir / "parts" / f".progress-{self.rank:05d}-of-{self.count:05d}.jsonl"
