"""Identity records, the fields a caller may set, list queries and pages, and the wire shapes.

`Identity` is a frozen slots dataclass: stores hand out the same object to many readers, and a million of
them must stay small. Every optional field is stored normalized (empty string, empty list or empty
object = absent), so "did this payload change anything?" is a plain equality test and the wire form can
omit absent fields instead of sending null (spec §0 "Nulls").
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The field limits are defined with their rules; re-exported here, where the slice's other limits are.
from orq_proxy.identities.rules import (
    DISPLAY_NAME_MAX,
    EMAIL_MAX,
    EXTERNAL_ID_MAX,
    METADATA_MAX_KEYS,
    TAG_MAX_CHARS,
    TAGS_MAX,
    URL_MAX,
    check_display_name,
    check_email,
    check_external_id,
    check_metadata,
    check_tags,
    check_url,
)

__all__ = [
    "DEFAULT_LIMIT",
    "DISPLAY_NAME_MAX",
    "EMAIL_MAX",
    "EXTERNAL_ID_MAX",
    "MAX_LIMIT",
    "METADATA_MAX_KEYS",
    "SEARCH_MAX",
    "SEARCH_MIN",
    "SORT_DISPLAY_NAME",
    "SORT_UPDATED",
    "TAGS_MAX",
    "TAG_MAX_CHARS",
    "URL_MAX",
    "Identity",
    "IdentityCreate",
    "IdentityExistsError",
    "IdentityFields",
    "IdentityPage",
    "IdentityQuery",
    "IdentityUpdate",
    "InvalidCursorError",
    "SortBy",
    "apply_fields",
    "identity_to_wire",
    "make_search_text",
    "name_sort_key",
    "new_identity",
    "normalize_fields",
    "search_needle",
]

SEARCH_MIN: Final = 2
SEARCH_MAX: Final = 255
DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 50

SORT_DISPLAY_NAME: Final = "IDENTITY_SORT_FIELD_DISPLAY_NAME"
SORT_UPDATED: Final = "IDENTITY_SORT_FIELD_UPDATED"
SortBy = Literal["IDENTITY_SORT_FIELD_DISPLAY_NAME", "IDENTITY_SORT_FIELD_UPDATED"]

# Sorts after every real display name: identities without one come last in a name-ordered list.
_NO_NAME: Final = "\U0010ffff"
_SEARCH_SEPARATOR: Final = "\x00"


class IdentityExistsError(Exception):
    """`external_id` is already taken in this workspace."""

    def __init__(self, external_id: str) -> None:
        super().__init__(f"an identity with external_id {external_id!r} already exists")
        self.external_id = external_id


class InvalidCursorError(ValueError):
    """A list cursor that cannot be placed in the requested order (the message names the parameter)."""

    def __init__(self, param: str, cursor: str) -> None:
        super().__init__(f"{param}: no identity with _id {cursor!r} in this workspace")
        self.param = param


class IdentityFields(TypedDict, total=False):
    """The settable fields of an identity, normalized; a key that is present is a field the caller gave.

    `None` clears a field. Tags are a tuple of distinct strings, metadata a plain JSON object.
    """

    display_name: str | None
    email: str | None
    avatar_url: str | None
    tags: tuple[str, ...]
    metadata: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity record (a user, team, project or client) of one workspace.

    `created`/`updated` are ISO-8601 UTC strings with milliseconds (`2026-01-01T00:00:00.000Z`), a
    fixed-width form that also sorts correctly as text. `search_text` is the casefolded external id,
    display name and email, precomputed so a search is one substring test per record.
    """

    id: str
    workspace_id: str
    external_id: str
    created: str
    updated: str
    display_name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] | None = None
    search_text: str = ""


@dataclass(frozen=True, slots=True)
class IdentityQuery:
    """One list request. At most one of `starting_after` / `ending_before` is set.

    Orders: default `_id` descending (newest first); `IDENTITY_SORT_FIELD_UPDATED`: most recently
    updated first; `IDENTITY_SORT_FIELD_DISPLAY_NAME`: display name A to Z (casefolded), identities
    without one last. Ties always break by `_id` in the same direction, so every order is total and a
    cursor (an `_id`) has one exact place in it.
    """

    limit: int = DEFAULT_LIMIT
    starting_after: str | None = None
    ending_before: str | None = None
    search: str | None = None
    tags: tuple[str, ...] = ()
    sort_by: SortBy | None = None


@dataclass(frozen=True, slots=True)
class IdentityPage:
    """A page in the requested order; `has_more`: more items exist beyond it in the paging direction."""

    data: list[Identity]
    has_more: bool


def make_search_text(external_id: str, display_name: str | None, email: str | None) -> str:
    """What a search matches against: the three profile fields, casefolded, NUL-separated."""
    parts = [external_id]
    if display_name:
        parts.append(display_name)
    if email:
        parts.append(email)
    return _SEARCH_SEPARATOR.join(parts).casefold()


def name_sort_key(display_name: str | None) -> str:
    """The display-name order key: casefolded name, or a sentinel that sorts after every name."""
    return display_name.casefold() if display_name else _NO_NAME


def search_needle(search: str) -> str | None:
    """The casefolded needle, or None when it can never match (it would span two fields)."""
    needle = search.casefold()
    return None if _SEARCH_SEPARATOR in needle else needle


def _interned_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    # Tags repeat across identities; interning keeps one string object per distinct tag.
    return tuple(sys.intern(tag) for tag in tags)


def normalize_fields(fields: Mapping[str, Any]) -> IdentityFields:
    """Canonical stored form: `""`/`[]`/`{}` clear a field (None), tags deduplicated in order, interned."""
    out: IdentityFields = {}
    for key in ("display_name", "email", "avatar_url"):
        if key in fields:
            value = fields[key]
            out[key] = value or None
    if "tags" in fields:
        tags = fields["tags"] or ()
        out["tags"] = _interned_tags(tuple(dict.fromkeys(tags)))
    if "metadata" in fields:
        out["metadata"] = dict(fields["metadata"]) if fields["metadata"] else None
    return out


def apply_fields(
    record: Identity, fields: IdentityFields, updated: str | Callable[[], str]
) -> Identity | None:
    """The record with `fields` applied and `updated` set, or None when nothing would change.

    Allocates nothing when nothing changed: the hot path upserts on every request that carries an
    identity, and most of those repeat what the record already says. `updated` may be a callable, called
    only when something changes (formatting the time is most of an unchanged upsert's cost otherwise).
    """
    changed = False
    for key, value in fields.items():
        if getattr(record, key) != value:
            changed = True
            break
    if not changed:
        return None
    if callable(updated):
        updated = updated()
    display_name = fields.get("display_name", record.display_name)
    email = fields.get("email", record.email)
    return Identity(
        id=record.id,
        workspace_id=record.workspace_id,
        external_id=record.external_id,
        created=record.created,
        updated=updated,
        display_name=display_name,
        email=email,
        avatar_url=fields.get("avatar_url", record.avatar_url),
        tags=fields.get("tags", record.tags),
        metadata=fields.get("metadata", record.metadata),
        search_text=(
            record.search_text
            if display_name == record.display_name and email == record.email
            else make_search_text(record.external_id, display_name, email)
        ),
    )


def new_identity(
    identity_id: str, workspace: str, external_id: str, fields: IdentityFields, now: str
) -> Identity:
    """A fresh record (`created` and `updated` share one string object)."""
    display_name = fields.get("display_name")
    email = fields.get("email")
    return Identity(
        id=identity_id,
        workspace_id=workspace,
        external_id=external_id,
        created=now,
        updated=now,
        display_name=display_name,
        email=email,
        avatar_url=fields.get("avatar_url"),
        tags=fields.get("tags", ()),
        metadata=fields.get("metadata"),
        search_text=make_search_text(external_id, display_name, email),
    )


def identity_to_wire(
    record: Identity, *, metrics: Mapping[str, Any] | None = None, budget: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The spec §2.1 object: `_id` and snake_case keys, absent optional fields omitted (never null)."""
    out: dict[str, Any] = {
        "_id": record.id,
        "external_id": record.external_id,
        "workspace_id": record.workspace_id,
        "created": record.created,
        "updated": record.updated,
    }
    if record.display_name is not None:
        out["display_name"] = record.display_name
    if record.email is not None:
        out["email"] = record.email
    if record.avatar_url is not None:
        out["avatar_url"] = record.avatar_url
    if record.tags:
        out["tags"] = list(record.tags)
    if record.metadata:
        out["metadata"] = dict(record.metadata)
    if metrics is not None:
        out["metrics"] = dict(metrics)
    if budget is not None:
        out["budget"] = dict(budget)
    return out


# ---- management API payloads (pydantic at the boundary) --------------------------------------------
# Each field's rule is the one in `rules` that proxied calls use too. The validators run before pydantic's
# own type check (`mode="before"`), so a wrong type gets the rule's words as well; a broken rule raises
# `IdentityRuleError`, which passes through pydantic untouched and `api.py` answers 400 naming
# `<field>: <rule>`. Null stays "not given" (`fields()` drops it), so it skips the rule.


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    display_name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("display_name", mode="before")
    @classmethod
    def _display_name(cls, value: Any) -> Any:
        return None if value is None else check_display_name(value, "display_name")

    @field_validator("email", mode="before")
    @classmethod
    def _email(cls, value: Any) -> Any:
        return None if value is None else check_email(value, "email")

    @field_validator("avatar_url", mode="before")
    @classmethod
    def _avatar_url(cls, value: Any) -> Any:
        return None if value is None else check_url(value, "avatar_url")

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        return None if value is None else check_tags(value, "tags")

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        return None if value is None else check_metadata(value, "metadata")

    def fields(self) -> IdentityFields:
        """The fields the caller sent (explicit nulls count as "not given"), normalized."""
        given = {key: getattr(self, key) for key in self.model_fields_set}
        return normalize_fields({k: v for k, v in given.items() if v is not None and k != "external_id"})


class IdentityCreate(_Payload):
    """`POST /v2/identities` body."""

    external_id: str = Field(min_length=1)  # (min_length for the OpenAPI schema; the rule runs first)

    @model_validator(mode="before")
    @classmethod
    def _external_id(cls, data: Any) -> Any:
        # A model validator, not a field one: it also sees a missing id ("is required"), and it runs
        # before the other fields, so the id is reported first, as on proxied calls.
        if isinstance(data, dict):
            check_external_id(data.get("external_id"), "external_id")
        return data


class IdentityUpdate(_Payload):
    """`PATCH /v2/identities/{id}` body: omitted = unchanged, `""`/`[]`/`{}` clear (spec §2.5)."""
