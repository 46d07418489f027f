"""Queries from another collection: their labels said in the database's vocabulary.

Collections name their classes differently and cut tissue differently: CRC-VAL-HE-7K's
smooth muscle (MUS) and stroma (STR) are both Kather 2016's 02_STROMA (its stroma includes
smooth muscle), its mucus (MUC) falls in 05_DEBRIS (debris includes necrosis, haemorrhage
and mucus), NORM is 06_MUCOSA. A label map is a CSV of `query_label,database_label` rows
(several query labels may share a database label); every query label must be mapped, so
that a query is never scored against a class the database cannot hold.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from histoseek.dataset import Dataset
from histoseek.errors import HistoseekError

MAX_ROWS = 10_000  # a label map is a vocabulary, not data


def read_label_map(path: Path) -> dict[str, str]:
    """query label -> database label, from a CSV with header `query_label,database_label`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"query_label", "database_label"} <= set(reader.fieldnames):
                raise HistoseekError(f"label map {path} needs a header row `query_label,database_label`")
            mapping: dict[str, str] = {}
            for number, row in enumerate(reader, start=2):
                if number > MAX_ROWS:
                    raise HistoseekError(f"label map {path} has more than {MAX_ROWS} rows")
                source, target = (row.get("query_label") or "").strip(), (row.get("database_label") or "").strip()
                if not source or not target:
                    raise HistoseekError(f"label map {path}, line {number}: both labels are needed")
                if mapping.get(source, target) != target:
                    raise HistoseekError(f"label map {path}, line {number}: {source} is mapped to both "
                                         f"{mapping[source]} and {target}")
                mapping[source] = target
    except OSError as exc:
        raise HistoseekError(f"cannot read the label map {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HistoseekError(f"label map {path} is not a CSV text file ({exc})") from exc
    if not mapping:
        raise HistoseekError(f"label map {path} maps no label")
    return mapping


def relabel(queries: Dataset, mapping: dict[str, str], database_labels: list[str]) -> Dataset:
    """`queries` with each label replaced by its database label; refuses unmapped query labels
    and targets the database does not hold (a typo would silently score every such query 0)."""
    unmapped = sorted({item.label for item in queries.items} - set(mapping))
    if unmapped:
        raise HistoseekError(f"the label map has no row for the query labels {', '.join(unmapped)}")
    unknown = sorted({mapping[item.label] for item in queries.items} - set(database_labels))
    if unknown:
        raise HistoseekError(f"the label map names labels the database does not hold: {', '.join(unknown)} "
                             f"(it holds {', '.join(sorted(set(database_labels)))})")
    return Dataset(queries.root, [replace(item, label=mapping[item.label]) for item in queries.items])
