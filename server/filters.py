"""Metadata filters of a search: which items may be results, by label, group and source.

A filter is applied inside the vector search (FAISS: an IDSelector over the allowed ids;
Milvus: a boolean expression on the collection's scalar fields), never by fetching more
results and dropping some, so k results come back whenever k items match.

Each list is bounded (count and length of its values, checked before any work) because a
client sends them: a filter costs at most MAX_VALUES look-ups per field, whatever it says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace

from server.fields import InvalidField, text_field

MAX_VALUES = 100  # per list; more is not a filter a person types, and bounds a request's cost
FIELDS = ("label", "group", "source")


@dataclass(frozen=True)
class ItemFilter:
    """Items whose label, group and source are in the `*s` lists (when given) and in no `exclude_*` list."""
    labels: tuple[str, ...] = ()
    exclude_labels: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    exclude_groups: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    exclude_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            values = getattr(self, f.name)
            if isinstance(values, str):  # a lone string would read as a list of its characters
                values = (values,)
            if len(values) > MAX_VALUES:
                raise InvalidField(f"filter {f.name} lists {len(values):,} values, more than {MAX_VALUES}")
            field = f.name.removeprefix("exclude_").removesuffix("s")
            checked = tuple(dict.fromkeys(text_field(field, str(v), f"filter {f.name}") for v in values))
            object.__setattr__(self, f.name, checked)

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def include(self, field: str) -> tuple[str, ...]:
        return getattr(self, f"{field}s")

    def exclude(self, field: str) -> tuple[str, ...]:
        return getattr(self, f"exclude_{field}s")

    def without_group(self, group: str | None) -> "ItemFilter":
        """This filter, also excluding `group` (the query's own slide or patient)."""
        if group is None or group in self.exclude_groups:
            return self
        return replace(self, exclude_groups=(*self.exclude_groups, group))

    def matches(self, label: str, group: str, source: str) -> bool:
        values = {"label": label, "group": group, "source": source}
        return all((not self.include(f) or values[f] in self.include(f)) and values[f] not in self.exclude(f)
                   for f in FIELDS)

    def describe(self) -> dict[str, list[str]]:
        """The non-empty lists, as the API echoes them."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}


def milvus_expression(where: ItemFilter, columns: dict[str, str]) -> str:
    """`where` as a Milvus boolean expression over the scalar fields named in `columns`.
    Values are written as JSON string literals (Milvus reads their escapes), so a value can
    never end its literal and add to the expression; "" means every item."""
    terms = []
    for field in FIELDS:
        column = columns[field]
        if where.include(field):
            terms.append(f"{column} in [{', '.join(json.dumps(v, ensure_ascii=False) for v in where.include(field))}]")
        if where.exclude(field):
            terms.append(f"{column} not in [{', '.join(json.dumps(v, ensure_ascii=False) for v in where.exclude(field))}]")
    return " and ".join(terms)


def from_lists(**lists: list[str] | None) -> ItemFilter | None:
    """A filter from optional lists (the API's and the CLI's fields), or None when all are empty."""
    unknown = set(lists) - {f.name for f in fields(ItemFilter)}
    if unknown:
        raise InvalidField(f"unknown filter fields {sorted(unknown)}")
    where = ItemFilter(**{name: tuple(values or ()) for name, values in lists.items()})
    return None if where.empty else where


__all__ = ["ItemFilter", "InvalidField", "MAX_VALUES", "from_lists", "milvus_expression"]
