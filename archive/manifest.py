"""The archive manifest: one SQLite file (what each image became, which shard holds it, which failed and why).

SQLite rather than JSON lines: a shard's items are committed in one transaction after the shard file
is renamed into place, so a crash or `kill -9` at any moment leaves a manifest that lists exactly the
complete shards; resuming needs no repair of half-written lines, and lookups by key or hash are
indexed. It ships with Python.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST = "manifest.sqlite"
FORMAT_VERSION = "2"  # 2: q8-zstd stores MED-predicted residuals (1: the raw codes)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, items INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY, source TEXT NOT NULL, sha256 TEXT, status TEXT NOT NULL, reason TEXT,
    width INTEGER, height INTEGER, encoded_width INTEGER, encoded_height INTEGER, latent_shape TEXT,
    format TEXT, shard TEXT, tensor TEXT, offset INTEGER, nbytes INTEGER, bpp REAL,
    model TEXT, scaling_factor REAL, shift_factor REAL, extra TEXT,
    crop_top INTEGER, crop_left INTEGER, variants TEXT);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
"""


@dataclass
class ItemRecord:
    """One row of `items`: an encoded image (status ok), a failure, or a skipped duplicate."""

    key: str
    source: str
    status: str  # ok | failed | duplicate
    sha256: str | None = None
    reason: str | None = None
    width: int | None = None  # the original image
    height: int | None = None
    encoded_width: int | None = None  # after the size policy: what decoding gives back
    encoded_height: int | None = None
    latent_shape: list[int] | None = None
    format: str | None = None
    shard: str | None = None
    tensor: str | None = None  # name of the stored tensor in the shard
    offset: int | None = None  # byte offset of that tensor's data in the shard file
    nbytes: int | None = None  # stored bytes, per-channel quantization parameters included
    bpp: float | None = None  # nbytes * 8 / original pixels
    model: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    extra: dict[str, Any] | None = None
    # The crop the size policy applied, in the image scaled to cover the target (SDXL's
    # crop_coords_top_left); (0, 0) for native and resize. None in archives written before it.
    crop_top: int | None = None
    crop_left: int | None = None
    # Everything stored for the image (one dict per size; see `variants.py`); None: the latents alone.
    variants: list[dict[str, Any]] | None = None

    def row(self) -> tuple:
        values = asdict(self)
        for name in JSON_COLUMNS:
            values[name] = None if values[name] is None else json.dumps(values[name])
        return tuple(values[f.name] for f in fields(self))

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "ItemRecord":
        """The record of a row; ArchiveError naming the column that is not JSON."""
        values = dict(row)
        for name in ADDED_COLUMNS:  # absent from archives written before them
            values.setdefault(name, None)
        for name in JSON_COLUMNS:
            try:
                values[name] = None if values[name] is None else json.loads(values[name])
            except (ValueError, TypeError, RecursionError):
                raise ArchiveError(f"manifest column {name} is not JSON") from None
        return cls(**{name: values[name] for name in COLUMNS})


COLUMNS = tuple(f.name for f in fields(ItemRecord))
JSON_COLUMNS = ("latent_shape", "extra", "variants")
# Columns added since format version 2's first archives: optional to readers, added by a resuming writer.
ADDED_COLUMNS = {"crop_top": "INTEGER", "crop_left": "INTEGER", "variants": "TEXT"}


class ArchiveError(ValueError):
    """An archive, or one of its entries, that cannot be read as the format says."""


class Manifest:
    """The manifest of `folder`: created and written with `create`, else opened for queries only."""

    def __init__(self, folder: Path, *, create: bool = False) -> None:
        path = Path(folder) / MANIFEST
        if not create and not path.is_file():
            raise FileNotFoundError(f"{folder}: not a latent archive (no {MANIFEST})")
        try:
            if create:
                self.connection = sqlite3.connect(path)
                self.connection.executescript(f"BEGIN; {SCHEMA} COMMIT;")  # a kill leaves all of it or none
                self._add_columns()
            else:
                # Read-write underneath so that the journal a killed writer left is rolled back, but
                # query_only: a reader never changes the manifest, whatever it holds.
                self.connection = sqlite3.connect(path)
                self.connection.execute("PRAGMA query_only = ON")
                self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(f"{folder}: not a latent archive ({MANIFEST}: {exc})") from None
        self.connection.row_factory = sqlite3.Row
        self.after_commit: Callable[[], None] | None = None  # what a remote archive does after each commit

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self.connection:
            yield
        if self.after_commit:
            self.after_commit()

    def _add_columns(self) -> None:
        """An archive written before ADDED_COLUMNS gains them (NULL in its old rows) when a writer resumes it."""
        found = {row[1] for row in self.connection.execute("PRAGMA table_info(items)")}
        with self.connection:
            for name, kind in ADDED_COLUMNS.items():
                if name not in found:
                    self.connection.execute(f"ALTER TABLE items ADD COLUMN {name} {kind}")

    def _check_schema(self) -> None:
        required = tuple(c for c in COLUMNS if c not in ADDED_COLUMNS)
        for table, wanted in (("meta", ("key", "value")), ("shards", ("name", "sha256", "bytes", "items")),
                              ("items", required)):
            found = {row[1] for row in self.connection.execute(f"PRAGMA table_info({table})")}
            missing = [column for column in wanted if column not in found]
            if missing:
                raise sqlite3.DatabaseError(f"table {table} lacks {', '.join(missing)}")

    def close(self) -> None:
        self.connection.close()

    def meta(self) -> dict[str, str]:
        return {row["key"]: row["value"] for row in self.connection.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict[str, Any]) -> None:
        with self._transaction():
            rows = [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in values.items()]
            self.connection.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def keys(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT key FROM items")}

    def sha256_of(self, key: str) -> str | None:
        row = self.connection.execute("SELECT sha256 FROM items WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def hashes(self) -> dict[str, str]:
        """sha256 -> key of every encoded image (for --dedupe)."""
        rows = self.connection.execute("SELECT sha256, key FROM items WHERE status = 'ok' AND sha256 IS NOT NULL")
        return {row[0]: row[1] for row in rows}

    def shard_names(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT name FROM shards")}

    def shards(self) -> list[sqlite3.Row]:
        return list(self.connection.execute("SELECT * FROM shards ORDER BY name"))

    def commit_shard(self, name: str, sha256: str, size: int, records: list[ItemRecord]) -> None:
        """The shard and its items in one transaction: either all of it is in the archive or none."""
        placeholders = ", ".join("?" * len(COLUMNS))
        with self._transaction():
            self.connection.execute("INSERT INTO shards VALUES (?, ?, ?, ?)", (name, sha256, size, len(records)))
            self.connection.executemany(f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                                        [r.row() for r in records])

    def replace_shards(self, old: list[str], name: str, sha256: str, size: int, offsets: dict[str, int]) -> None:
        """Shards `old` merged into `name` (`offsets`: tensor -> byte offset there), in one transaction."""
        marks = ", ".join("?" * len(old))
        with self._transaction():
            moved = list(self.connection.execute(f"SELECT key, tensor FROM items WHERE shard IN ({marks})", old))
            self.connection.execute("INSERT INTO shards VALUES (?, ?, ?, ?)", (name, sha256, size, len(moved)))
            self.connection.executemany("UPDATE items SET shard = ?, offset = ? WHERE key = ?",
                                        [(name, offsets[tensor], key) for key, tensor in moved])
            self.connection.executemany("DELETE FROM shards WHERE name = ?", [(n,) for n in old])

    def add(self, records: list[ItemRecord]) -> None:
        """Items without latents (failures, duplicates), committed at once."""
        placeholders = ", ".join("?" * len(COLUMNS))
        with self._transaction():
            self.connection.executemany(f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                                        [r.row() for r in records])

    def rows(self, status: str | None = None) -> Iterator[sqlite3.Row]:
        query = "SELECT * FROM items" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        yield from self.connection.execute(query, (status,) if status else ())

    def items(self, status: str | None = None) -> Iterator[ItemRecord]:
        """Records in encoding order; ArchiveError at a row that cannot be read."""
        for row in self.rows(status):
            yield ItemRecord.from_row(row)

    def item(self, key: str) -> ItemRecord | None:
        row = self.connection.execute("SELECT * FROM items WHERE key = ?", (key,)).fetchone()
        return ItemRecord.from_row(row) if row else None

    def counts(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.connection.execute("SELECT status, COUNT(*) FROM items GROUP BY status")}

    def totals(self) -> dict[str, float]:
        row = self.connection.execute(
            "SELECT COUNT(*), SUM(nbytes), SUM(width * height), AVG(bpp) FROM items WHERE status = 'ok'").fetchone()
        return {"images": row[0] or 0, "bytes": row[1] or 0, "pixels": row[2] or 0, "mean_bpp": row[3]}
