"""Published builds by number, and pinning a bank to one build, tag or table version.

After weeks of scheduled rebuilds users ask "what changed between Monday's build and today's?":
that needs every table opened at one published build's versions (the `live` manifest's history,
storage/live.py), at a Lance tag, or at a hand-picked version, and a clear error when that
version is gone (retention keeps only the newest `rebuild.keep_builds` builds) instead of
Lance's "not found" from deep inside a scan.
"""

from __future__ import annotations

from model.errors import M3Error
from storage.bank import LATEST, Bank
from storage.live import live_versions, numbered, read_manifest


class BuildError(M3Error, ValueError):
    pass


def history(bank: Bank) -> list[dict]:
    """Remembered published builds, oldest first, each with its number and `live` (bool)."""
    manifest = read_manifest(bank)
    if not manifest:
        return []
    out = numbered(manifest.get("history", []))
    return [{**h, "live": h["versions"] == manifest["versions"]} for h in out]


def resolve_build(bank: Bank, spec: str | int) -> dict:
    """The history entry of a build: its number (>= 1), `live`, or an offset from live (0 = live,
    -1 = the build before it)."""
    builds = history(bank)
    if not builds:
        raise BuildError(f"bank {bank.uri} has no published build yet (run `m3 rebuild`)")
    known = ", ".join(str(h["build"]) for h in builds)
    text = str(spec).strip()
    if text == "live":
        return next(h for h in reversed(builds) if h["live"])
    try:
        n = int(text)
    except ValueError:
        raise BuildError(f"build {text!r} is not a number, `live` or an offset like -1 (builds: {known})") from None
    if n <= 0:
        live = max(i for i, h in enumerate(builds) if h["live"])
        if live + n < 0:
            raise BuildError(f"build {n}: only {live} build(s) before live are remembered (builds: {known})")
        return builds[live + n]
    for h in builds:
        if h["build"] == n:
            return h
    raise BuildError(
        f"no published build {n} in {bank.uri} (builds: {known}; live is "
        f"{next(h['build'] for h in reversed(builds) if h['live'])})"
    )


def table_versions(bank: Bank, table: str) -> list[int]:
    return [v["version"] for v in bank.dataset(table, LATEST, check=False).version_refs()]


def pins_for(
    bank: Bank, build: str | int | None = None, tag: str | None = None, versions: list[str] = ()
) -> dict[str, int]:
    """Table -> version to read: the live build (or latest, before any publish), then `build` or
    `tag` (on the tables that have it), then each `versions` item "TABLE=V". Every pin is checked
    to exist on disk."""
    tables = bank.tables()
    pins = live_versions(bank)
    what = {t: "the live build" for t in pins}
    if build is not None and tag is not None:
        raise BuildError("pin by --build or by --tag, not both")
    if build is not None:
        entry = resolve_build(bank, build)
        pins.update(entry["versions"])
        what.update({t: f"build {entry['build']}" for t in entry["versions"]})
    if tag is not None:
        tagged = {t: bank.tags(t)[tag] for t in tables if tag in bank.tags(t)}
        if not tagged:
            names = sorted({name for t in tables for name in bank.tags(t)})
            raise BuildError(f"no table of {bank.uri} has a tag {tag!r} (tags: {', '.join(names) or 'none'})")
        pins.update(tagged)
        what.update({t: f"tag {tag!r}" for t in tagged})
    for item in versions:
        table, _, v = item.partition("=")
        if table not in tables or not v.strip().isdigit():
            raise BuildError(f"--version {item!r}: expected TABLE=VERSION with TABLE one of {', '.join(tables)}")
        pins[table] = int(v)
        what[table] = f"--version {item}"
    for table, v in pins.items():
        on_disk = table_versions(bank, table)
        if v not in on_disk:
            raise BuildError(
                f"table {table} has no version {v} ({what[table]}; versions on disk: "
                f"{', '.join(map(str, on_disk))}; older ones were removed by retention)"
            )
    return pins


def pinned_bank(bank: Bank, build: str | int | None = None, tag: str | None = None, versions: list[str] = ()) -> Bank:
    """A read-only view of the bank with every table pinned as `pins_for` resolves it."""
    return bank.at(pins_for(bank, build, tag, versions))


def reader_bank(bank: Bank, build: str | int | None = None, tag: str | None = None, versions: list[str] = ()) -> Bank:
    """The bank a reader opens: the live build, or, given a build, tag or versions, that view
    (`pinned_bank`). The one resolution every reading command shares (`m3 sql`, `m3 search`,
    `m3 generate`, `m3 eval`), so `--build -1` means the same build to each of them."""
    if build is None and tag is None and not versions:
        return bank.at()
    return pinned_bank(bank, build, tag, versions)


def builds_table(bank: Bank):
    """The `builds` view of `m3 sql`: one row per remembered published build, oldest first.

    bytes = on-disk size of the files the build's versions reference (storage/footprint.py),
    summed over its tables (files shared by two tables' versions cannot exist: one directory
    per table); NULL for a build some of whose versions retention removed (`on_disk` false), and
    refs_rows/memories_rows likewise for the versions gone."""
    import json

    import pyarrow as pa

    from storage.footprint import TableFiles

    builds = history(bank)
    files = {t: TableFiles(bank, t) for t in sorted({t for h in builds for t in h["versions"]})}

    def rows(table: str, v: int | None) -> int | None:
        if v is None or files[table].version_bytes(v) is None:
            return None
        return bank.dataset(table, version=v, check=False).count_rows()

    out = []
    for h in builds:
        sizes = [files[t].version_bytes(v) for t, v in h["versions"].items()]
        complete = None not in sizes
        out.append(
            {
                "build": h["build"],
                "published_at": h["published_at"],
                "live": h["live"],
                "versions": json.dumps(h["versions"], sort_keys=True),
                "refs_rows": rows("refs", h["versions"].get("refs")) if "refs" in files else None,
                "memories_rows": rows("memories", h["versions"].get("memories")) if "memories" in files else None,
                "bytes": sum(sizes) if complete else None,
                "on_disk": complete,
                "ingest_key": h.get("ingest_key"),
                "encode_key": h.get("encode_key"),
            }
        )
    schema = pa.schema(
        [
            ("build", pa.int64()),
            ("published_at", pa.timestamp("s", tz="UTC")),
            ("live", pa.bool_()),
            ("versions", pa.string()),
            ("refs_rows", pa.int64()),
            ("memories_rows", pa.int64()),
            ("bytes", pa.int64()),
            ("on_disk", pa.bool_()),
            ("ingest_key", pa.string()),
            ("encode_key", pa.string()),
        ]
    )
    for r in out:
        r["published_at"] = int(float(r["published_at"]))
    return pa.Table.from_pylist(out, schema=schema)
