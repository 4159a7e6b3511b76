"""Which objects of an export become training images, and under which class.

Only validated objects are ground truth (a person confirmed them); predicted
and dubious ones are left out unless asked, and counted. A class is the
object's category, or one level of its hierarchy:

- `category` (the default): `object_annotation_category`, EcoTaxa's display name;
- a number N: the N-th name of `object_annotation_hierarchy` from its root
  (`living` is 1); an object identified no deeper than that keeps its category;
- names (`Copepoda,Chaetognatha`): an object under one of them takes the
  deepest one it is under (every copepod genus becomes "Copepoda"); the
  others keep their category.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PlanktonioError
from .export import STATUSES, EcoObject, Export

DEFAULT_STATUSES = ("validated",)


@dataclass(frozen=True)
class Level:
    """How a class is named: by category, by depth in the hierarchy, or by named groups."""

    depth: int | None = None
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Level:
        text = (text or "category").strip()
        if text == "category":
            return cls()
        if text.isdigit():
            if int(text) < 1:
                raise PlanktonioError(f"--ecotaxa-level {text}: a depth counts from 1 (the root, 'living')")
            return cls(depth=int(text))
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if not names:
            raise PlanktonioError(f"--ecotaxa-level {text!r}: expected 'category', a depth (1, 2, ...) or "
                                  f"comma-separated names of the hierarchy (e.g. Copepoda)")
        return cls(names=names)

    def needs_hierarchy(self) -> bool:
        return self.depth is not None or bool(self.names)

    def category_of(self, obj: EcoObject) -> str:
        """The EcoTaxa name this object is trained under."""
        parts = [p.strip() for p in obj.hierarchy.split(">")] if obj.hierarchy else []
        if self.depth is not None and len(parts) >= self.depth:
            return parts[self.depth - 1]
        if self.names:
            under = [p for p in parts if p in self.names]
            if under:
                return under[-1]
        return obj.category


def parse_statuses(text: str | None) -> tuple[str, ...]:
    statuses = tuple(s.strip().lower() for s in (text or ",".join(DEFAULT_STATUSES)).split(",") if s.strip())
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown or not statuses:
        raise PlanktonioError(f"--ecotaxa-status {text!r}: expected some of {', '.join(STATUSES)} "
                              f"(comma-separated; only validated objects are ground truth)")
    return statuses


def folder_name(category: str) -> str:
    """A class folder's name for an EcoTaxa category: its name, with what a path or manifest line cannot hold
    replaced (the categories file maps it back)."""
    name = re.sub(r"[/\\\x00-\x1f\x7f]", "_", category).strip()
    return "_" + name if name.startswith(".") else name or "_"


@dataclass
class Selection:
    """The objects kept (with their class folder), and how many were left out, by reason."""

    kept: list[tuple[EcoObject, str]]
    categories: dict[str, str]          # class folder -> EcoTaxa category
    left_out: dict[str, int]            # reason -> objects
    left_out_ids: list[tuple[str, str]]  # (object_id, reason)

    def summary(self) -> str:
        parts = [f"{n} {reason}" for reason, n in sorted(self.left_out.items())]
        return (f"EcoTaxa export: {len(self.kept)} objects kept in {len(self.categories)} classes"
                + (f"; left out: {', '.join(parts)}" if parts else ""))


def select(export: Export, level: Level, statuses: tuple[str, ...] = DEFAULT_STATUSES) -> Selection:
    """Keep the objects of the wanted statuses that have a category and an image; name their classes."""
    if level.needs_hierarchy() and "object_annotation_hierarchy" not in export.columns:
        raise PlanktonioError(f"--ecotaxa-level: {export.source} has no object_annotation_hierarchy column; "
                              f"export again with the taxonomy lineage, or use --ecotaxa-level category")
    kept, categories, left_out, ids = [], {}, {}, []
    for obj in export.objects:
        reason = None
        if obj.status not in statuses:
            reason = f"{obj.status or 'unclassified'} (status not asked for)"
        elif not obj.category:
            reason = "no category"
        elif not obj.image:
            reason = "image missing from the export"
        if reason:
            left_out[reason] = left_out.get(reason, 0) + 1
            ids.append((obj.object_id, reason))
            continue
        category = level.category_of(obj)
        folder = folder_name(category)
        if categories.setdefault(folder, category) != category:
            raise PlanktonioError(f"EcoTaxa categories {categories[folder]!r} and {category!r} would share the "
                                  f"class folder {folder!r}; choose another --ecotaxa-level")
        kept.append((obj, folder))
    return Selection(kept, dict(sorted(categories.items())), left_out, ids)
