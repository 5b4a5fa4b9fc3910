"""The identity field rules, in one place, for both surfaces that take identity fields.

- The proxied calls' body identity (`orq.identity`, the deprecated `orq.contact`, a top-level
  `identity`): `identities/middleware.py` calls these and answers 400 in OpenAI's shape, `param` set to
  the field's path in the body (`orq.identity.tags[1]`).
- The management API (`POST /v2/identities`, `PATCH /v2/identities/{id}`): the pydantic payloads in
  `identities/models.py` call these from their validators; `identities/api.py` answers 400 in orq's shape.

One function per field. Each takes the value as sent and the field's name on the calling surface (the
proxied surface says `id` and `logo_url` where the API says `external_id` and `avatar_url`), returns the
value to keep, and raises `IdentityRuleError(field, rule)` for the first rule it breaks. `None` means
"not given" on both surfaces, so callers skip it; only `check_external_id` takes it (the id is required).

`IdentityRuleError` is deliberately not a `ValueError`: pydantic turns a `ValueError` raised in a
validator into its own error (`"Value error, ..."`, located at the top-level field only), but lets any
other exception through unchanged, so the API can render the same field path and rule text as the
proxied surface.

Failure policy: these are pure checks; they raise and never log.
"""

from __future__ import annotations

import re
from typing import Any, Final

__all__ = [
    "DISPLAY_NAME_MAX",
    "EMAIL_MAX",
    "EMAIL_PART",
    "EXTERNAL_ID_MAX",
    "METADATA_MAX_KEYS",
    "TAGS_MAX",
    "TAG_MAX_CHARS",
    "URL_MAX",
    "IdentityRuleError",
    "check_display_name",
    "check_email",
    "check_external_id",
    "check_metadata",
    "check_metadata_objects",
    "check_tags",
    "check_url",
]

EXTERNAL_ID_MAX: Final = 255
DISPLAY_NAME_MAX: Final = 255
EMAIL_MAX: Final = 254
URL_MAX: Final = 2048
TAG_MAX_CHARS: Final = 100
TAGS_MAX: Final = 10
METADATA_MAX_KEYS: Final = 20

# Basic shape only (orq documents "basic format validation"): something@something, no spaces. orq's own
# examples use addresses such as `a@x`, so a dot in the domain is not required.
# Not `@` and not whitespace, by both Python's and ECMAScript's idea of `\s` (they differ on U+001C-U+001F,
# U+0085 and U+FEFF), so that the OpenAPI document's pattern (`openapi.py`, read by JSON Schema tools with
# ECMAScript regexes) accepts exactly what this does.
EMAIL_PART = r"[^@\s\x1c-\x1f\x85\ufeff]+"
_EMAIL = re.compile(EMAIL_PART + "@" + EMAIL_PART)


class IdentityRuleError(Exception):
    """An identity field that breaks a rule.

    Attributes:
        field: the field's path inside the identity object, in the caller's names (`email`, `tags[1]`,
            `metadata[0]`); a surface prefixes its own location (`orq.identity.`).
        rule: what the value must be (`must be a string`, `at most 10 tags are allowed, got 11`).

    Example:
        try:
            tags = check_tags(raw_tags, "tags")
        except IdentityRuleError as exc:
            print(f"orq.identity.{exc.field}: {exc.rule}")
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def _text(value: Any, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise IdentityRuleError(field, "must be a string")
    if len(value) > max_chars:
        raise IdentityRuleError(field, f"must be at most {max_chars} characters, got {len(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise IdentityRuleError(field, "must be valid Unicode text (no lone surrogates)") from None
    return value


def check_external_id(value: Any, field: str) -> str:
    """The identity's id (`external_id`; `id` on proxied calls): required, 1 to 255 characters, not blank."""
    if value is None:
        raise IdentityRuleError(field, "is required")
    text = _text(value, field, EXTERNAL_ID_MAX)
    if not text.strip():
        raise IdentityRuleError(field, f"must be 1 to {EXTERNAL_ID_MAX} characters and not blank")
    return text


def check_display_name(value: Any, field: str) -> str:
    """At most 255 characters; `""` is allowed (it clears the field)."""
    return _text(value, field, DISPLAY_NAME_MAX)


def check_email(value: Any, field: str) -> str:
    """At most 254 characters shaped like `name@example.com`; `""` is allowed (it clears the field)."""
    text = _text(value, field, EMAIL_MAX)
    if text and _EMAIL.fullmatch(text) is None:
        raise IdentityRuleError(field, "must be an email address like name@example.com")
    return text


def check_url(value: Any, field: str) -> str:
    """An avatar or logo URL (`avatar_url`; `logo_url` on proxied calls): at most 2048 characters."""
    return _text(value, field, URL_MAX)


def check_tags(value: Any, field: str) -> list[str]:
    """A list of at most 10 non-empty strings of at most 100 characters each; an error names the item."""
    if not isinstance(value, list):
        raise IdentityRuleError(field, "must be a list of strings")
    if len(value) > TAGS_MAX:
        raise IdentityRuleError(field, f"at most {TAGS_MAX} tags are allowed, got {len(value)}")
    for i, tag in enumerate(value):
        if not isinstance(tag, str) or not tag:
            raise IdentityRuleError(f"{field}[{i}]", "must be a non-empty string")
        # `_text` can fail only then; the usual short ASCII tag skips building the item's path.
        if len(tag) > TAG_MAX_CHARS or not tag.isascii():
            _text(tag, f"{field}[{i}]", TAG_MAX_CHARS)
    return value


def _check_metadata_size(merged: dict[str, Any], field: str) -> dict[str, Any]:
    if len(merged) > METADATA_MAX_KEYS:
        raise IdentityRuleError(field, f"at most {METADATA_MAX_KEYS} keys are allowed, got {len(merged)}")
    return merged


def check_metadata(value: Any, field: str) -> dict[str, Any]:
    """The management API's form: a JSON object of at most 20 keys."""
    if not isinstance(value, dict):
        raise IdentityRuleError(field, "must be an object")
    return _check_metadata_size(value, field)


def check_metadata_objects(value: Any, field: str) -> dict[str, Any]:
    """The proxied calls' form: orq sends a list of objects (`[{"plan": "pro"}]`), merged in order into
    one object (a later key wins); its docs also show a plain object. At most 20 keys after merging."""
    # Parsed JSON objects are dicts; testing for `dict` costs a tenth of the `Mapping` ABC check.
    if isinstance(value, dict):
        merged = dict(value)
    elif isinstance(value, list):
        merged = {}
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise IdentityRuleError(f"{field}[{i}]", "must be an object")
            merged.update(item)
    else:
        raise IdentityRuleError(field, "must be an object or a list of objects")
    return _check_metadata_size(merged, field)
