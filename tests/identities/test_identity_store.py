"""The `IdentityStore` protocol suite, run against the in-memory, SQLite and PostgreSQL stores alike."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from orq_proxy.identities import store as store_module
from orq_proxy.identities.models import (
    SORT_DISPLAY_NAME,
    SORT_UPDATED,
    Identity,
    IdentityExistsError,
    IdentityFields,
    IdentityQuery,
    InvalidCursorError,
    SortBy,
    name_sort_key,
    normalize_fields,
)
from orq_proxy.identities.postgres import PostgresIdentityStore
from orq_proxy.identities.sqlite import SqliteIdentityStore
from orq_proxy.identities.store import (
    IdentityStore,
    InMemoryIdentityStore,
    _SortedKeys,
    identity_store_from_url,
)
from orq_proxy.ids import MonotonicIds
from orq_proxy.testing.clock import FakeClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture(params=["memory", "sqlite", "sqlite-in-memory", "postgres"])
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[IdentityStore]:
    """Every store the protocol suite runs against (SQLite on a file reads inline; `:memory:` does not;
    PostgreSQL on a database of its own)."""
    s: IdentityStore
    if request.param == "memory":
        s = InMemoryIdentityStore(clock=clock)
    elif request.param == "sqlite":
        s = SqliteIdentityStore(str(tmp_path / "state.db"), clock=clock)
    elif request.param == "sqlite-in-memory":
        s = SqliteIdentityStore(":memory:", clock=clock)
    else:
        pg = PostgresIdentityStore(request.getfixturevalue("pg_url"), clock=clock)
        await pg.open()
        s = pg
    yield s
    await s.aclose()


def f(**fields: Any) -> IdentityFields:
    return normalize_fields(fields)


async def test_create_assigns_ulid_and_clock_timestamps(store: IdentityStore) -> None:
    """create: a ULID `_id`, created == updated from the clock, the given fields normalized."""
    rec = await store.create(
        "ws",
        "user_1",
        f(display_name="Ada", email="ada@example.com", tags=["b", "a", "b"], metadata={"n": 1}),
    )
    assert str(ULID.from_str(rec.id)) == rec.id
    assert ULID.from_str(rec.id).datetime == START
    assert (rec.created, rec.updated) == ("2026-03-01T12:00:00.000Z", "2026-03-01T12:00:00.000Z")
    assert (rec.workspace_id, rec.external_id, rec.display_name, rec.email) == (
        "ws",
        "user_1",
        "Ada",
        "ada@example.com",
    )
    assert rec.tags == ("b", "a")
    assert rec.metadata == {"n": 1}
    assert rec.avatar_url is None
    assert await store.get("ws", rec.id) == rec


async def test_external_id_unique_per_workspace(store: IdentityStore) -> None:
    """A second create with the same external_id fails in the same workspace, succeeds in another."""
    await store.create("ws", "user_1", {})
    with pytest.raises(IdentityExistsError):
        await store.create("ws", "user_1", f(display_name="x"))
    other = await store.create("ws2", "user_1", {})
    assert other.workspace_id == "ws2"


async def test_workspaces_are_isolated(store: IdentityStore) -> None:
    """Nothing of workspace A is visible or changeable from workspace B."""
    rec = await store.create("a", "user_1", f(tags=["t"]))
    assert await store.get("b", rec.id) is None
    assert await store.get_by_external_id("b", "user_1") is None
    assert await store.resolve("b", rec.id) is None
    assert await store.resolve("b", "user_1") is None
    assert await store.update("b", rec.id, f(display_name="hijack")) is None
    assert await store.delete("b", rec.id) is None
    assert (await store.list("b", IdentityQuery())).data == []
    assert (await store.list("b", IdentityQuery(tags=("t",)))).data == []
    upserted = await store.upsert("b", "user_1", f(display_name="B's"))
    assert upserted.id != rec.id
    assert await store.get("a", rec.id) == rec


async def test_resolve_prefers_id_over_external_id(store: IdentityStore) -> None:
    """`{id}` resolves by `_id` first, then by external_id."""
    first = await store.create("ws", "user_1", {})
    # An identity whose external_id is the other one's `_id`.
    second = await store.create("ws", first.id, {})
    assert (await store.resolve("ws", first.id)) == first
    assert (await store.resolve("ws", "user_1")) == first
    assert (await store.resolve("ws", second.id)) == second
    assert await store.resolve("ws", "nobody") is None


async def test_update_changes_only_given_fields(store: IdentityStore, clock: FakeClock) -> None:
    """update: given fields change, others stay, `updated` moves; None/()/{} clear."""
    rec = await store.create("ws", "u", f(display_name="Ada", email="a@x", tags=["t"], metadata={"k": 1}))
    clock.advance(5)
    up = await store.update("ws", rec.id, f(email="b@x"))
    assert up is not None
    assert (up.display_name, up.email, up.tags, up.metadata) == ("Ada", "b@x", ("t",), {"k": 1})
    assert up.updated == "2026-03-01T12:00:05.000Z"
    assert up.created == rec.created
    clock.advance(5)
    cleared = await store.update("ws", rec.id, f(email="", tags=[], metadata={}, display_name=""))
    assert cleared is not None
    assert (cleared.display_name, cleared.email, cleared.tags, cleared.metadata) == (None, None, (), None)
    assert await store.get("ws", rec.id) == cleared
    assert await store.update("ws", "missing", f(email="a@x")) is None


async def test_update_without_change_keeps_updated(store: IdentityStore, clock: FakeClock) -> None:
    """Writing the values the record already has changes nothing, not even `updated`."""
    rec = await store.create("ws", "u", f(display_name="Ada", tags=["t"]))
    clock.advance(60)
    same = await store.update("ws", rec.id, f(display_name="Ada", tags=["t"]))
    assert same == rec
    assert await store.update("ws", rec.id, {}) == rec


async def test_upsert_creates_then_changes_only_given(store: IdentityStore, clock: FakeClock) -> None:
    """upsert: create when new; then only the given fields change; equal payload is a no-op."""
    rec = await store.upsert("ws", "u", f(display_name="Ada", email="a@x"))
    assert (rec.external_id, rec.display_name, rec.email) == ("u", "Ada", "a@x")
    clock.advance(1)
    again = await store.upsert("ws", "u", f(display_name="Ada"))
    assert again == rec
    clock.advance(1)
    changed = await store.upsert("ws", "u", f(tags=["vip"]))
    assert (changed.id, changed.display_name, changed.email, changed.tags) == (rec.id, "Ada", "a@x", ("vip",))
    assert changed.updated == "2026-03-01T12:00:02.000Z"
    assert (await store.list("ws", IdentityQuery(tags=("vip",)))).data == [changed]


async def test_memory_upsert_unchanged_returns_the_same_object() -> None:
    """The hot path: an unchanged upsert allocates no new record."""
    s = InMemoryIdentityStore(clock=FakeClock(START))
    rec = await s.upsert("ws", "u", f(display_name="Ada", metadata={"a": [1]}))
    assert await s.upsert("ws", "u", f(display_name="Ada", metadata={"a": [1]})) is rec


async def test_delete(store: IdentityStore) -> None:
    """delete returns the record once; it is gone from every lookup and index."""
    rec = await store.create("ws", "u", f(tags=["t"], display_name="Ada"))
    keep = await store.create("ws", "v", f(tags=["t"]))
    assert await store.delete("ws", rec.id) == rec
    assert await store.delete("ws", rec.id) is None
    assert await store.get("ws", rec.id) is None
    assert await store.get_by_external_id("ws", "u") is None
    assert (await store.list("ws", IdentityQuery(tags=("t",)))).data == [keep]
    assert (await store.list("ws", IdentityQuery(search="ada"))).data == []
    assert (await store.list("ws", IdentityQuery(sort_by=SORT_DISPLAY_NAME))).data == [keep]
    again = await store.create("ws", "u", {})
    assert again.id != rec.id


async def test_ids_follow_creation_order_on_a_still_clock(store: IdentityStore) -> None:
    """With the clock standing still, `_id`s still grow: newest-first is creation order reversed."""
    recs = [await store.create("ws", f"u{i}", {}) for i in range(5)]
    assert [r.id for r in recs] == sorted(r.id for r in recs)
    page = await store.list("ws", IdentityQuery())
    assert [r.external_id for r in page.data] == ["u4", "u3", "u2", "u1", "u0"]


async def test_search_is_case_insensitive_over_three_fields(store: IdentityStore) -> None:
    """search matches external_id, display_name and email, ignoring case; not across fields."""
    await store.create("ws", "ACME-1", f(display_name="Ada Lovelace"))
    await store.create("ws", "u2", f(email="Grace@Example.com"))
    await store.create("ws", "u3", f(display_name="Straße"))

    async def ids(q: str) -> list[str]:
        return [r.external_id for r in (await store.list("ws", IdentityQuery(search=q))).data]

    assert await ids("acme") == ["ACME-1"]
    assert await ids("LOVE") == ["ACME-1"]
    assert await ids("example.COM") == ["u2"]
    assert await ids("STRASSE") == ["u3"]
    assert await ids("1ada") == []  # would only match across two fields
    assert await ids("u") == ["u3", "u2"]


async def test_tag_filter_needs_all_tags(store: IdentityStore) -> None:
    """filter_by.tags: an identity must carry every listed tag."""
    await store.create("ws", "a", f(tags=["x"]))
    await store.create("ws", "b", f(tags=["x", "y"]))
    await store.create("ws", "c", f(tags=["y", "z", "x"]))

    async def ids(*tags: str, sort_by: SortBy | None = None) -> list[str]:
        page = await store.list("ws", IdentityQuery(tags=tags, sort_by=sort_by))
        return [r.external_id for r in page.data]

    assert await ids("x") == ["c", "b", "a"]
    assert await ids("x", "y") == ["c", "b"]
    assert await ids("y", "x", "z") == ["c"]
    assert await ids("x", "nope") == []
    assert await ids("x", "y", sort_by=SORT_DISPLAY_NAME) == ["b", "c"]


async def test_sort_by_updated(store: IdentityStore, clock: FakeClock) -> None:
    """IDENTITY_SORT_FIELD_UPDATED: most recently updated first."""
    a = await store.create("ws", "a", {})
    clock.advance(1)
    await store.create("ws", "b", {})
    clock.advance(1)
    await store.create("ws", "c", {})
    page = await store.list("ws", IdentityQuery(sort_by=SORT_UPDATED))
    assert [r.external_id for r in page.data] == ["c", "b", "a"]
    clock.advance(1)
    await store.update("ws", a.id, f(display_name="now"))
    page = await store.list("ws", IdentityQuery(sort_by=SORT_UPDATED))
    assert [r.external_id for r in page.data] == ["a", "c", "b"]


async def test_sort_by_display_name(store: IdentityStore) -> None:
    """IDENTITY_SORT_FIELD_DISPLAY_NAME: A to Z ignoring case, identities without a name last."""
    await store.create("ws", "n1", {})
    await store.create("ws", "zed", f(display_name="zed"))
    await store.create("ws", "ada", f(display_name="Ada"))
    await store.create("ws", "bob", f(display_name="bob"))
    await store.create("ws", "n2", {})
    page = await store.list("ws", IdentityQuery(sort_by=SORT_DISPLAY_NAME))
    assert [r.external_id for r in page.data] == ["ada", "bob", "zed", "n1", "n2"]
    rec = await store.get_by_external_id("ws", "n1")
    assert rec is not None
    await store.update("ws", rec.id, f(display_name="Aaron"))
    page = await store.list("ws", IdentityQuery(sort_by=SORT_DISPLAY_NAME))
    assert [r.external_id for r in page.data] == ["n1", "ada", "bob", "zed", "n2"]


async def test_unknown_cursor(store: IdentityStore) -> None:
    """`_id` order places any cursor; a sorted order needs an existing identity, else InvalidCursorError."""
    recs = [await store.create("ws", f"u{i}", {}) for i in range(3)]
    await store.delete("ws", recs[1].id)
    page = await store.list("ws", IdentityQuery(starting_after=recs[1].id))
    assert [r.external_id for r in page.data] == ["u0"]
    with pytest.raises(InvalidCursorError) as info:
        await store.list("ws", IdentityQuery(starting_after=recs[1].id, sort_by=SORT_UPDATED))
    assert info.value.param == "starting_after"
    with pytest.raises(InvalidCursorError) as info:
        await store.list("empty", IdentityQuery(ending_before="nope", sort_by=SORT_DISPLAY_NAME))
    assert info.value.param == "ending_before"


def _expected(records: list[Identity], query: IdentityQuery) -> list[Identity]:
    """The whole filtered list in the requested order, by brute force."""
    rows = [
        r
        for r in records
        if all(t in r.tags for t in query.tags)
        and (not query.search or query.search.casefold() in r.search_text)
    ]
    if query.sort_by == SORT_UPDATED:
        rows.sort(key=lambda r: (r.updated, r.id), reverse=True)
    elif query.sort_by == SORT_DISPLAY_NAME:
        rows.sort(key=lambda r: (name_sort_key(r.display_name), r.id))
    else:
        rows.sort(key=lambda r: r.id, reverse=True)
    return rows


async def _walk_all(store: IdentityStore, query: IdentityQuery, limit: int) -> list[Identity]:
    """Page forward to the end, then backward to the start; both walks must agree. The list seen."""
    page = await store.list("ws", IdentityQuery(**{**_fields(query), "limit": limit}))
    seen = list(page.data)
    pages = [page.data]
    while page.has_more:
        assert len(page.data) == limit
        page = await store.list(
            "ws", IdentityQuery(**{**_fields(query), "limit": limit, "starting_after": page.data[-1].id})
        )
        seen.extend(page.data)
        pages.append(page.data)
    records = seen
    # Backward from the last page: each step returns the page before, has_more until the first.
    back: list[Identity] = list(pages[-1])
    first = pages[-1][0].id if pages[-1] else None
    while first is not None:
        page = await store.list(
            "ws", IdentityQuery(**{**_fields(query), "limit": limit, "ending_before": first})
        )
        if not page.data:
            assert page.has_more is False
            break
        assert page.has_more == (len(back) + len(page.data) < len(records))
        back = page.data + back
        first = page.data[0].id if page.has_more else None
    assert back == records
    return records


def _fields(query: IdentityQuery) -> dict[str, Any]:
    return {"search": query.search, "tags": query.tags, "sort_by": query.sort_by}


async def _all_records(store: IdentityStore) -> list[Identity]:
    records: list[Identity] = []
    q = IdentityQuery(limit=50)
    while True:
        page = await store.list("ws", q)
        records.extend(page.data)
        if not page.has_more:
            return records
        q = IdentityQuery(limit=50, starting_after=page.data[-1].id)


async def _check_every_query(store: IdentityStore) -> None:
    """Every order x search x tag filter x page size: both walks equal the brute-force list."""
    records = await _all_records(store)
    for sort_by in (None, SORT_UPDATED, SORT_DISPLAY_NAME):
        for search in (None, "user-01", "ADA", "example", "nomatch"):
            for tag_filter in ((), ("red",), ("red", "blue")):
                query = IdentityQuery(search=search, tags=tag_filter, sort_by=sort_by)
                expected = _expected(records, query)
                for limit in (1, 7, 50):
                    seen = await _walk_all(store, query, limit)
                    assert seen == expected, (sort_by, search, tag_filter, limit)


NAMES = ["Ada", "ada", "Bob", "carol", None, "Émile", "zoe"]
TAGS = ["red", "green", "blue"]


async def _churn(store: IdentityStore, clock: FakeClock, rnd: random.Random, start: int) -> None:
    """Updates (names, emails, tags), deletes and creates, some within the same millisecond."""
    everyone = await _all_records(store)
    for rec in rnd.sample(everyone, 15):
        clock.advance(rnd.choice([0, 1]))
        await store.update(
            "ws",
            rec.id,
            f(
                display_name=rnd.choice(NAMES),
                email=rnd.choice([None, f"{rec.external_id}@example.com"]),
                tags=rnd.sample(TAGS, rnd.randint(0, 2)),
            ),
        )
    for rec in rnd.sample(everyone, 5):
        await store.delete("ws", rec.id)
    for i in range(start, start + 5):
        clock.advance(rnd.choice([0, 0.001]))
        await store.create("ws", f"user-{i:03d}", f(display_name=rnd.choice(NAMES), tags=rnd.sample(TAGS, 2)))


async def test_pages_match_brute_force(store: IdentityStore, clock: FakeClock) -> None:
    """Forward and backward walks of every query equal the brute-force list, before and after churn."""
    rnd = random.Random(7)
    for i in range(60):
        clock.advance(rnd.choice([0, 0, 0.001, 1]))
        await store.create(
            "ws",
            f"user-{i:03d}",
            f(
                display_name=rnd.choice(NAMES),
                email=rnd.choice([None, f"u{i}@example.com"]),
                tags=rnd.sample(TAGS, rnd.randint(0, 3)),
            ),
        )
    await _check_every_query(store)
    await _churn(store, clock, rnd, 100)
    await _check_every_query(store)


async def test_memory_small_blocks_stay_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 3-key blocks (many splits, merges and search summaries), churn never leaves a stale index."""
    monkeypatch.setattr(store_module, "_BLOCK", 3)
    clock = FakeClock(START)
    store = InMemoryIdentityStore(clock=clock)
    rnd = random.Random(11)
    for i in range(40):
        clock.advance(rnd.choice([0, 1]))
        await store.create("ws", f"user-{i:03d}", f(display_name=rnd.choice(NAMES), tags=rnd.sample(TAGS, 2)))
    for round_ in range(3):
        await _check_every_query(store)
        await _churn(store, clock, rnd, 100 + 10 * round_)
    await _check_every_query(store)


async def test_has_more_at_both_ends(store: IdentityStore) -> None:
    """has_more is exact at the edges: a full last page says False, a cursor at the start gives []."""
    recs = [await store.create("ws", f"u{i}", {}) for i in range(4)]  # newest first: u3 u2 u1 u0
    page = await store.list("ws", IdentityQuery(limit=2))
    assert ([r.external_id for r in page.data], page.has_more) == (["u3", "u2"], True)
    page = await store.list("ws", IdentityQuery(limit=2, starting_after=page.data[-1].id))
    assert ([r.external_id for r in page.data], page.has_more) == (["u1", "u0"], False)
    page = await store.list("ws", IdentityQuery(limit=2, ending_before=page.data[0].id))
    assert ([r.external_id for r in page.data], page.has_more) == (["u3", "u2"], False)
    page = await store.list("ws", IdentityQuery(limit=2, ending_before=recs[3].id))
    assert (page.data, page.has_more) == ([], False)
    page = await store.list("ws", IdentityQuery(limit=4))
    assert (len(page.data), page.has_more) == (4, False)
    page = await store.list("ws", IdentityQuery(limit=3, ending_before=recs[0].id))
    assert ([r.external_id for r in page.data], page.has_more) == (["u3", "u2", "u1"], False)
    page = await store.list("ws", IdentityQuery(limit=2, ending_before=recs[0].id))
    assert ([r.external_id for r in page.data], page.has_more) == (["u2", "u1"], True)


async def test_sqlite_survives_restart(tmp_path: Path) -> None:
    """A new SqliteIdentityStore on the same file sees every record; new ids keep growing."""
    path = str(tmp_path / "state.db")
    clock = FakeClock(START)
    first = SqliteIdentityStore(path, clock=clock)
    a = await first.create("ws", "a", f(display_name="Ada", tags=["t"], metadata={"plan": "pro"}))
    b = await first.upsert("ws", "b", f(email="b@x"))
    await first.update("ws", a.id, f(email="ada@x"))
    await first.aclose()
    await first.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await first.get("ws", a.id)

    second = SqliteIdentityStore(path, clock=FakeClock(START))  # a clock that went back: ids still grow
    try:
        got = await second.get_by_external_id("ws", "a")
        assert got is not None
        assert (got.id, got.email, got.tags, got.metadata) == (a.id, "ada@x", ("t",), {"plan": "pro"})
        assert await second.get("ws", b.id) == b
        assert [r.id for r in (await second.list("ws", IdentityQuery(tags=("t",)))).data] == [a.id]
        c = await second.create("ws", "c", {})
        assert c.id > b.id
        assert await second.count("ws") == 3
    finally:
        await second.aclose()


def test_sqlite_bad_path_fails_at_construction(tmp_path: Path) -> None:
    """A path that cannot be opened fails when the store is built, not on the first request."""
    with pytest.raises(Exception, match="unable to open"):
        SqliteIdentityStore(str(tmp_path / "missing-dir" / "state.db"))


async def test_store_from_url(tmp_path: Path) -> None:
    """`[storage] state`: memory, sqlite:///path, postgres(ql)://; anything else is a ValueError naming the setting."""
    assert isinstance(identity_store_from_url("memory"), InMemoryIdentityStore)
    sqlite_store = identity_store_from_url(f"sqlite://{tmp_path}/s.db")
    assert isinstance(sqlite_store, SqliteIdentityStore)
    await sqlite_store.aclose()
    assert (tmp_path / "s.db").exists()
    for url in ("postgres://x", "postgresql://postgres@127.0.0.1:1/x"):  # built without the network
        pg_store = identity_store_from_url(url)
        assert isinstance(pg_store, PostgresIdentityStore)
        await pg_store.aclose()
    for bad in ("sqlite://", "postgre://x", "memroy", f"sqlite://{tmp_path}/no-such-dir/s.db"):
        with pytest.raises(ValueError, match=r"\[storage\] state"):
            identity_store_from_url(bad)


async def test_memory_count() -> None:
    """count() per workspace."""
    s = InMemoryIdentityStore(clock=FakeClock(START))
    await s.create("a", "x", {})
    await s.create("a", "y", {})
    assert (await s.count("a"), await s.count("b")) == (2, 0)


def test_monotonic_ids() -> None:
    """Same millisecond or a clock going back: the next id is the previous plus one."""
    clock = FakeClock(START)
    ids = MonotonicIds(clock)
    a, b = ids.next(), ids.next()
    assert int(ULID.from_str(b)) == int(ULID.from_str(a)) + 1
    later = ids.next(datetime(2027, 1, 1, tzinfo=UTC))
    assert ULID.from_str(later).datetime == datetime(2027, 1, 1, tzinfo=UTC)
    assert ids.next() > later


@pytest.mark.parametrize("block", [1, 2, 3, 1000])
def test_sorted_keys_against_a_list(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """_SortedKeys behaves like a sorted list under random adds/discards, iterated from any key."""
    monkeypatch.setattr(store_module, "_BLOCK", block)
    rnd = random.Random(block)
    keys: _SortedKeys[str] = _SortedKeys([f"{n:04d}" for n in rnd.sample(range(1000), 20)])
    model = sorted(keys.ascending_after(None))
    assert len(model) == len(keys) == 20
    for _ in range(600):
        k = f"{rnd.randrange(1000):04d}"
        if rnd.random() < 0.6:
            if k not in model:
                keys.add(k)
                model.append(k)
                model.sort()
        else:
            keys.discard(k)
            if k in model:
                model.remove(k)
        assert len(keys) == len(model)
        probe = rnd.choice([None, k, f"{rnd.randrange(1000):04d}"])
        if probe is None:
            assert list(keys.ascending_after(None)) == model
            assert list(keys.descending_before(None)) == model[::-1]
        else:
            assert list(keys.ascending_after(probe)) == [m for m in model if m > probe]
            assert list(keys.descending_before(probe)) == [m for m in model if m < probe][::-1]
    empty: _SortedKeys[str] = _SortedKeys()
    assert list(empty.descending_before("x")) == list(empty.ascending_after("x")) == []
    empty.discard("x")
    assert len(empty) == 0
