"""The `IdentityStore` protocol and its in-memory implementation.

Every method is async so a shared backend (SQLite here, PostgreSQL later) drops in; the in-memory store
never awaits between a read and the write that depends on it, so each call is atomic on one event loop
without locks. Failure policy: identity fails closed, so a store error propagates to the caller.

Scale (1,000,000 identities per workspace, see `benchmarks/identities_scale.py`): records live in a dict
by `_id` and a dict by `external_id`; each list order is a sorted index of keys (`_SortedKeys`, a list
of sorted blocks: O(log n) to find a place, O(block) to insert or remove), so an unfiltered page walks
only `limit + 1` keys from its cursor. A tag filter walks the posting list of its rarest tag. A search
walks the chosen order testing one precomputed casefolded string per record until the page is full, so
its cost grows with how rare the match is (a full scan when there are fewer matches than `limit`).
The display-name and updated-time indexes are built the first time a workspace is listed in that order
and kept up to date afterwards, so they cost nothing for a deployment that never sorts by them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, Generic, Protocol, TypeVar

from orq_proxy.clock import Clock, SystemClock
from orq_proxy.identities.models import (
    SORT_UPDATED,
    Identity,
    IdentityExistsError,
    IdentityFields,
    IdentityPage,
    IdentityQuery,
    InvalidCursorError,
    apply_fields,
    name_sort_key,
    new_identity,
    search_needle,
)
from orq_proxy.ids import MonotonicIds
from orq_proxy.postgres import is_postgres_url, require_driver
from orq_proxy.timefmt import rfc3339_millis

__all__ = ["IdentityStore", "InMemoryIdentityStore", "identity_store_from_url"]

_BLOCK = 1000  # keys per block of a sorted index; blocks split at twice this
_BLOCK_TEXT_SEPARATOR = "\x01"

_K = TypeVar("_K", str, tuple[str, str])


class IdentityStore(Protocol):
    """Identity records per workspace. A workspace never sees another's identities.

    `_id` is a ULID assigned by the store; `external_id` is unique per workspace; `created`/`updated`
    come from the store's clock. `fields` arguments hold only the fields the caller gave, normalized
    (`models.normalize_fields`); a field that is absent is left unchanged.

    Example (a custom backend only has to provide these coroutines):
        store: IdentityStore = InMemoryIdentityStore(clock=SystemClock())
        record = await store.upsert("ws", "user_1", {"email": "ada@example.com"})
    """

    async def create(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        """A new identity; raises `IdentityExistsError` when `external_id` is taken."""
        ...

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        """By `_id`."""
        ...

    async def get_by_external_id(self, workspace: str, external_id: str) -> Identity | None:
        """By `external_id`."""
        ...

    async def resolve(self, workspace: str, ref: str) -> Identity | None:
        """By `_id` first, then by `external_id` (the `{id}` of the API paths)."""
        ...

    async def update(self, workspace: str, identity_id: str, fields: IdentityFields) -> Identity | None:
        """Apply the given fields to the identity with this `_id`; None when there is none.

        `updated` moves only when a value actually changes.
        """
        ...

    async def upsert(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        """Create the identity if new, else change only the given fields (atomically)."""
        ...

    async def delete(self, workspace: str, identity_id: str) -> Identity | None:
        """Remove the identity with this `_id`; the removed record, or None when there was none."""
        ...

    async def list(self, workspace: str, query: IdentityQuery) -> IdentityPage:
        """One cursor page; raises `InvalidCursorError` for a cursor that has no place in the order."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections, threads)."""
        ...


class _SortedKeys(Generic[_K]):
    """A sorted set of keys as a list of sorted blocks (a minimal B+-tree leaf level).

    Inserting or removing costs O(log n + block) instead of a list's O(n) memmove, and iteration can
    start at any key. Keys are unique here (every key ends with an `_id`).

    With `text_of`, each block also keeps a lazily built summary: the search texts of its keys joined in
    one string. A search tests a whole block with one C-speed substring scan and walks its keys one by
    one only when the block contains the needle, so a search that matches little costs about a scan of
    the text, not a Python step per identity. A summary is dropped whenever its block changes
    (`add`, `discard`) or a key's text changes (`touch`), and rebuilt on the next search.
    """

    __slots__ = ("_blocks", "_len", "_maxes", "_text_of", "_texts")

    def __init__(self, keys: list[_K] | None = None, text_of: Callable[[_K], str] | None = None) -> None:
        keys = sorted(keys) if keys else []
        self._blocks: list[list[_K]] = [keys[i : i + _BLOCK] for i in range(0, len(keys), _BLOCK)]
        self._maxes: list[_K] = [block[-1] for block in self._blocks]
        self._texts: list[str | None] = [None] * len(self._blocks)
        self._text_of: Callable[[_K], str] | None = text_of
        self._len = len(keys)

    def __len__(self) -> int:
        return self._len

    def add(self, key: _K) -> None:
        blocks, maxes = self._blocks, self._maxes
        self._len += 1
        if not blocks:
            blocks.append([key])
            maxes.append(key)
            self._texts.append(None)
            return
        i = bisect_left(maxes, key)
        if i == len(blocks):
            i -= 1  # beyond every key: the last block grows (the common case for new ULIDs)
        block = blocks[i]
        insort(block, key)
        maxes[i] = block[-1]
        self._texts[i] = None
        if len(block) > 2 * _BLOCK:
            blocks[i : i + 1] = [block[:_BLOCK], block[_BLOCK:]]
            maxes[i : i + 1] = [block[_BLOCK - 1], block[-1]]
            self._texts[i : i + 1] = [None, None]

    def discard(self, key: _K) -> None:
        blocks, maxes = self._blocks, self._maxes
        i = bisect_left(maxes, key)
        if i == len(blocks):
            return
        block = blocks[i]
        j = bisect_left(block, key)
        if j == len(block) or block[j] != key:
            return
        del block[j]
        self._len -= 1
        if block:
            maxes[i] = block[-1]
            self._texts[i] = None
        else:
            del blocks[i]
            del maxes[i]
            del self._texts[i]

    def touch(self, key: _K) -> None:
        """The search text of `key` changed: drop its block's summary."""
        i = bisect_left(self._maxes, key)
        if i < len(self._blocks):
            self._texts[i] = None

    def _may_contain(self, i: int, needle: str | None) -> bool:
        if needle is None or self._text_of is None:
            return True
        text = self._texts[i]
        if text is None:
            text = self._texts[i] = _BLOCK_TEXT_SEPARATOR.join(map(self._text_of, self._blocks[i]))
        return needle in text

    def ascending_after(self, key: _K | None, needle: str | None = None) -> Iterator[_K]:
        """Keys > `key` (all keys when None), smallest first; with `needle`, blocks whose summary lacks
        it are skipped (the caller still tests each key it gets)."""
        blocks = self._blocks
        if key is None:
            i, j = 0, 0
        else:
            i = bisect_right(self._maxes, key)
            j = bisect_right(blocks[i], key) if i < len(blocks) else 0
        while i < len(blocks):
            if self._may_contain(i, needle):
                yield from islice(blocks[i], j, None) if j else blocks[i]
            i, j = i + 1, 0

    def descending_before(self, key: _K | None, needle: str | None = None) -> Iterator[_K]:
        """Keys < `key` (all keys when None), largest first; `needle` as in `ascending_after`."""
        blocks = self._blocks
        i = len(blocks) - 1 if key is None else bisect_left(self._maxes, key)
        end: int | None = None  # where the first block's keys stop; None: the whole block
        if key is not None and i < len(blocks):
            end = bisect_left(blocks[i], key)
        i = min(i, len(blocks) - 1)
        while i >= 0:
            if self._may_contain(i, needle):
                yield from reversed(blocks[i]) if end is None else reversed(blocks[i][:end])
            i, end = i - 1, None


def _updated_key(record: Identity) -> tuple[str, str]:
    return (record.updated, record.id)


def _name_key(record: Identity) -> tuple[str, str]:
    return (name_sort_key(record.display_name), record.id)


class _Workspace:
    """One workspace's records and indexes."""

    __slots__ = ("by_external", "by_id", "by_name", "by_updated", "ids", "tags", "text_of_id", "text_of_key")

    def __init__(self) -> None:
        self.by_id: dict[str, Identity] = {}
        self.by_external: dict[str, str] = {}
        by_id = self.by_id
        self.text_of_id: Callable[[str], str] = lambda identity_id: by_id[identity_id].search_text
        self.text_of_key: Callable[[tuple[str, str]], str] = lambda key: by_id[key[1]].search_text
        self.ids: _SortedKeys[str] = _SortedKeys(text_of=self.text_of_id)
        self.tags: dict[str, _SortedKeys[str]] = {}
        # Built on first use (see the module docstring).
        self.by_updated: _SortedKeys[tuple[str, str]] | None = None
        self.by_name: _SortedKeys[tuple[str, str]] | None = None

    def _postings(self, tag: str) -> _SortedKeys[str]:
        postings = self.tags.get(tag)
        if postings is None:
            postings = self.tags[tag] = _SortedKeys(text_of=self.text_of_id)
        return postings

    def index(self, record: Identity) -> None:
        self.by_id[record.id] = record
        self.by_external[record.external_id] = record.id
        self.ids.add(record.id)
        for tag in record.tags:
            self._postings(tag).add(record.id)
        if self.by_updated is not None:
            self.by_updated.add(_updated_key(record))
        if self.by_name is not None:
            self.by_name.add(_name_key(record))

    def unindex(self, record: Identity) -> None:
        del self.by_id[record.id]
        del self.by_external[record.external_id]
        self.ids.discard(record.id)
        self._untag(record, record.tags)
        if self.by_updated is not None:
            self.by_updated.discard(_updated_key(record))
        if self.by_name is not None:
            self.by_name.discard(_name_key(record))

    def replace(self, old: Identity, new: Identity) -> None:
        """Swap a record for its updated version: move the keys that changed, and drop the search
        summaries of the blocks that hold it when its search text changed."""
        self.by_id[new.id] = new
        text_changed = old.search_text != new.search_text
        if text_changed:
            self.ids.touch(new.id)
        if old.tags != new.tags:
            self._untag(old, tuple(t for t in old.tags if t not in new.tags))
            for tag in new.tags:
                if tag not in old.tags:
                    self._postings(tag).add(new.id)
        if text_changed:
            for tag in new.tags:
                if tag in old.tags:
                    self.tags[tag].touch(new.id)
        for index, key_of in ((self.by_updated, _updated_key), (self.by_name, _name_key)):
            if index is None:
                continue
            old_key, new_key = key_of(old), key_of(new)
            if old_key != new_key:
                index.discard(old_key)
                index.add(new_key)
            elif text_changed:
                index.touch(new_key)

    def _untag(self, record: Identity, tags: tuple[str, ...]) -> None:
        for tag in tags:
            postings = self.tags.get(tag)
            if postings is not None:
                postings.discard(record.id)
                if not postings:
                    del self.tags[tag]

    def updated_index(self) -> _SortedKeys[tuple[str, str]]:
        if self.by_updated is None:
            keys = [_updated_key(r) for r in self.by_id.values()]
            self.by_updated = _SortedKeys(keys, text_of=self.text_of_key)
        return self.by_updated

    def name_index(self) -> _SortedKeys[tuple[str, str]]:
        if self.by_name is None:
            self.by_name = _SortedKeys([_name_key(r) for r in self.by_id.values()], text_of=self.text_of_key)
        return self.by_name


class InMemoryIdentityStore:
    """The default `IdentityStore`: everything in process memory, lost on restart.

    Args:
        clock: the time source for `created`/`updated` and the ULIDs.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self._ids = MonotonicIds(self._clock)
        self._workspaces: dict[str, _Workspace] = {}

    async def count(self, workspace: str) -> int:
        """How many identities the workspace has."""
        ws = self._workspaces.get(workspace)
        return len(ws.by_id) if ws else 0

    def _timestamp(self) -> str:
        return rfc3339_millis(self._clock.now())

    def _workspace(self, workspace: str) -> _Workspace:
        ws = self._workspaces.get(workspace)
        if ws is None:
            ws = self._workspaces[workspace] = _Workspace()
        return ws

    def _insert(self, ws: _Workspace, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        now = self._clock.now()
        record = new_identity(self._ids.next(now), workspace, external_id, fields, rfc3339_millis(now))
        ws.index(record)
        return record

    async def create(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        ws = self._workspace(workspace)
        if external_id in ws.by_external:
            raise IdentityExistsError(external_id)
        return self._insert(ws, workspace, external_id, fields)

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        ws = self._workspaces.get(workspace)
        return ws.by_id.get(identity_id) if ws else None

    async def get_by_external_id(self, workspace: str, external_id: str) -> Identity | None:
        ws = self._workspaces.get(workspace)
        if ws is None:
            return None
        identity_id = ws.by_external.get(external_id)
        return None if identity_id is None else ws.by_id[identity_id]

    async def resolve(self, workspace: str, ref: str) -> Identity | None:
        ws = self._workspaces.get(workspace)
        if ws is None:
            return None
        record = ws.by_id.get(ref)
        if record is None:
            identity_id = ws.by_external.get(ref)
            record = None if identity_id is None else ws.by_id[identity_id]
        return record

    def _apply(self, ws: _Workspace, record: Identity, fields: IdentityFields) -> Identity:
        if not fields:
            return record
        updated = apply_fields(record, fields, self._timestamp)
        if updated is None:
            return record
        ws.replace(record, updated)
        return updated

    async def update(self, workspace: str, identity_id: str, fields: IdentityFields) -> Identity | None:
        ws = self._workspaces.get(workspace)
        record = ws.by_id.get(identity_id) if ws else None
        if ws is None or record is None:
            return None
        return self._apply(ws, record, fields)

    async def upsert(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        ws = self._workspace(workspace)
        identity_id = ws.by_external.get(external_id)
        if identity_id is None:
            return self._insert(ws, workspace, external_id, fields)
        return self._apply(ws, ws.by_id[identity_id], fields)

    async def delete(self, workspace: str, identity_id: str) -> Identity | None:
        ws = self._workspaces.get(workspace)
        record = ws.by_id.get(identity_id) if ws else None
        if ws is None or record is None:
            return None
        ws.unindex(record)
        return record

    async def list(self, workspace: str, query: IdentityQuery) -> IdentityPage:
        ws = self._workspaces.get(workspace)
        if ws is None:
            if query.sort_by is not None and (query.starting_after or query.ending_before):
                raise InvalidCursorError(
                    "starting_after" if query.starting_after else "ending_before",
                    query.starting_after or query.ending_before or "",
                )
            return IdentityPage(data=[], has_more=False)
        return _page(ws, query)

    async def aclose(self) -> None:
        return None


def _walk(
    index: _SortedKeys[Any], cursor: Any, needle: str | None, *, descending: bool, backward: bool
) -> Iterator[Any]:
    """Index keys strictly beyond `cursor` in the walking direction (page order, or reversed when
    paging backwards), skipping blocks that cannot match `needle`."""
    if descending != backward:
        return index.descending_before(cursor, needle)
    return index.ascending_after(cursor, needle)


def _page(ws: _Workspace, query: IdentityQuery) -> IdentityPage:
    backward = query.ending_before is not None
    cursor_id = query.ending_before if backward else query.starting_after
    needle = search_needle(query.search) if query.search else None
    if query.search and needle is None:
        return IdentityPage(data=[], has_more=False)
    wanted_tags = query.tags
    by_id = ws.by_id

    # Which index to walk.
    keys: Iterator[Any]
    if query.sort_by is None:
        index: _SortedKeys[Any] = ws.ids
        if wanted_tags:
            # The rarest tag's posting list holds every candidate, in `_id` order.
            postings = [ws.tags.get(tag) for tag in wanted_tags]
            if any(p is None for p in postings):
                return IdentityPage(data=[], has_more=False)
            index = min((p for p in postings if p is not None), key=len)
        keys = _walk(index, cursor_id, needle, descending=True, backward=backward)
    else:
        if query.sort_by == SORT_UPDATED:
            sorted_index, key_of, descending = ws.updated_index(), _updated_key, True
        else:  # SORT_DISPLAY_NAME
            sorted_index, key_of, descending = ws.name_index(), _name_key, False
        cursor_key = None
        if cursor_id is not None:
            cursor_record = by_id.get(cursor_id)
            if cursor_record is None:
                raise InvalidCursorError("ending_before" if backward else "starting_after", cursor_id)
            cursor_key = key_of(cursor_record)
        keys = _walk(sorted_index, cursor_key, needle, descending=descending, backward=backward)

    # Lazy pipeline, in C where possible: index keys -> records -> filters -> the first limit + 1.
    records: Iterator[Identity] = map(by_id.__getitem__, map(_second, keys) if query.sort_by else keys)
    if needle is not None:
        records = (r for r in records if needle in r.search_text)
    # Walking one tag's posting list in `_id` order needs no check for that tag.
    if len(wanted_tags) > 1 or (wanted_tags and query.sort_by is not None):
        records = (r for r in records if all(tag in r.tags for tag in wanted_tags))
    data = list(islice(records, query.limit + 1))
    has_more = len(data) > query.limit
    del data[query.limit :]
    if backward:
        data.reverse()
    return IdentityPage(data=data, has_more=has_more)


def _second(key: tuple[str, str]) -> str:
    return key[1]


def identity_store_from_url(url: str, *, clock: Clock | None = None) -> IdentityStore:
    """The store named by `[storage] state`: `memory`, `sqlite:///abs/path.db` (durable), or
    `postgresql://...` / `postgres://...` (shared by replicas; needs the postgres extra).

    A PostgreSQL store is built without touching the network: call its `open()` before use.
    Raises ValueError for anything else, naming the setting.
    """
    if url == "memory":
        return InMemoryIdentityStore(clock=clock)
    if is_postgres_url(url):
        require_driver("state")
        from orq_proxy.identities.postgres import PostgresIdentityStore

        return PostgresIdentityStore(url, clock=clock)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path:
            raise ValueError(
                f"[storage] state {url!r}: give a file path, e.g. sqlite:///var/lib/orq/state.db"
            )
        import sqlite3

        from orq_proxy.identities.sqlite import SqliteIdentityStore

        try:
            return SqliteIdentityStore(path, clock=clock)
        except sqlite3.Error as exc:
            raise ValueError(f"[storage] state {url!r}: cannot open the database: {exc}") from exc
    raise ValueError(
        f"[storage] state must be 'memory', 'sqlite:///<path>' or 'postgresql://...', got {url!r}"
    )
