"""Bytes on disk per table version: why is the bank directory 40 GB?

Lance keeps every version's files until retention deletes the version, and versions share files
(a write that copies unchanged rows still writes new files, but an index or a tag does not). So
"the size of a version" is the size of the files its manifest references (data, deletion and
index files, plus the manifest itself), and a table's files split into `live` (referenced by a
set of versions: the kept builds) and `dead` (everything else in the table's directory: versions
retention will delete, tags, transaction files, leftovers of crashed writes).

Both come from Lance without reading data: `tracked_files` lists what each manifest references
(it reads every manifest, a few KB each) and `all_files` lists the directory with sizes.
"""

from __future__ import annotations

from collections import defaultdict

from storage.bank import LATEST, Bank


class TableFiles:
    """One listing of a table's files: sizes on disk and the files each version references."""

    def __init__(self, bank: Bank, table: str):
        ds = bank.dataset(table, LATEST, check=False)
        listing = ds.all_files().read_all()
        self.sizes: dict[str, int] = dict(
            zip(listing.column("path").to_pylist(), listing.column("size_bytes").to_pylist())
        )
        tracked = ds.tracked_files().read_all()
        self.by_version: dict[int, set[str]] = defaultdict(set)
        for v, path in zip(tracked.column("version").to_pylist(), tracked.column("path").to_pylist()):
            self.by_version[v].add(path)

    def total(self) -> int:
        return sum(self.sizes.values())

    def referenced(self, versions) -> set[str]:
        return set().union(*(self.by_version.get(v, set()) for v in versions)) & self.sizes.keys()

    def version_bytes(self, version: int) -> int | None:
        """Bytes of the files `version` references (None when the version is no longer on disk)."""
        if version not in self.by_version:
            return None
        return sum(self.sizes[p] for p in self.referenced([version]))

    def live_dead(self, versions) -> tuple[int, int]:
        """(bytes referenced by `versions`, every other byte in the table's directory)."""
        live = sum(self.sizes[p] for p in self.referenced(versions))
        return live, self.total() - live
