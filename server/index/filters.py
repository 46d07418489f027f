"""Metadata filters of a search: which items may be results, by label, group and source.

A filter is applied inside the vector search (FAISS: an IDSelector over the allowed ids;
Milvus: a boolean expression on the collection's scalar fields), never by fetching more
results and dropping some, so k results come back whenever k items match.

A client's lists are bounded (count and length of their values, checked by `from_lists`
before any work): a filter it sends costs at most MAX_VALUES look-ups per field. Filters the
system makes itself (the query's own group in an evaluation) hold stored values as they are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace

from server.index.fields import InvalidField, text_field

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
            object.__setattr__(self, f.name, tuple(dict.fromkeys(str(v) for v in values)))

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
    """A filter from a client's optional lists (the API's and the CLI's fields), each checked
    like a stored label or group; None when all are empty."""
    unknown = set(lists) - {f.name for f in fields(ItemFilter)}
    if unknown:
        raise InvalidField(f"unknown filter fields {sorted(unknown)}")
    checked = {}
    for name, values in lists.items():
        values = [values] if isinstance(values, str) else list(values or ())
        if len(values) > MAX_VALUES:
            raise InvalidField(f"filter {name} lists {len(values):,} values, more than {MAX_VALUES}")
        field = name.removeprefix("exclude_").removesuffix("s")
        checked[name] = tuple(text_field(field, str(v), f"filter {name}") for v in values)
    where = ItemFilter(**checked)
    return None if where.empty else where


__all__ = ["ItemFilter", "InvalidField", "MAX_VALUES", "from_lists", "milvus_expression"]
