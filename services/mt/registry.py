"""Which model translates which language pair, and the routes between languages: a direct
model when one exists, else two legs through the pivot language (es→pt = es→en→pt)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.languages import normalize_language


def parse_pair(pair: str) -> tuple[str, str]:
    """`"en-pt"` (or `"eng_Latn-por_Latn"`) -> ("en", "pt"); ValueError when it is not one."""
    parts = pair.split("-")
    languages = [normalize_language(part) for part in parts]
    if len(parts) != 2 or None in languages or languages[0] == languages[1]:
        raise ValueError(f"{pair!r} is not a language pair like 'en-pt'")
    return str(languages[0]), str(languages[1])


Family = Literal["bergamot", "hf"]


@dataclass(frozen=True)
class ModelSpec:
    """One model to load, and the pairs it serves (several for a multilingual checkpoint)."""

    name: str
    family: Family
    folder: Path
    pairs: tuple[tuple[str, str], ...]


def model_specs(bergamot: Mapping[str, Path], hf: Mapping[str, Path]) -> list[ModelSpec]:
    """The models a configuration names: one per folder, named after the folder."""
    folders: dict[tuple[Family, Path], list[tuple[str, str]]] = {}
    seen: set[tuple[str, str]] = set()
    family: Family
    for family, models in (("bergamot", bergamot), ("hf", hf)):
        for pair, folder in models.items():
            languages = parse_pair(pair)
            if languages in seen:
                raise ValueError(f"{pair} is configured twice")
            seen.add(languages)
            folders.setdefault((family, Path(folder).expanduser().resolve()), []).append(languages)
    specs = [
        ModelSpec(folder.name, family, folder, tuple(pairs))
        for (family, folder), pairs in folders.items()
    ]
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"two model folders share the name {duplicated[0]!r}; rename one")
    return specs


@dataclass(frozen=True)
class Leg:
    """One model run: `model` translates `source` into `target`."""

    source: str
    target: str
    model: str


@dataclass(frozen=True)
class Route:
    source: str
    target: str
    legs: tuple[Leg, ...]

    @property
    def pivot(self) -> str | None:
        return self.legs[0].target if len(self.legs) > 1 else None

    @property
    def models(self) -> list[str]:
        return [leg.model for leg in self.legs]


class Registry:
    def __init__(self, specs: list[ModelSpec], pivot_language: str) -> None:
        self._direct = {pair: spec.name for spec in specs for pair in spec.pairs}
        self.pivot_language = pivot_language

    @property
    def source_languages(self) -> set[str]:
        return {source for source, _ in self._direct}

    def route(self, source: str, target: str) -> Route | None:
        model = self._direct.get((source, target))
        if model is not None:
            return Route(source, target, (Leg(source, target, model),))
        pivot = self.pivot_language
        first = self._direct.get((source, pivot))
        second = self._direct.get((pivot, target))
        if source == target or first is None or second is None:
            return None
        return Route(source, target, (Leg(source, pivot, first), Leg(pivot, target, second)))

    def routes(self) -> list[Route]:
        """Every translatable pair: the direct ones, then the pivoted ones, each sorted."""
        direct = [self.route(source, target) for source, target in sorted(self._direct)]
        languages = sorted({lang for pair in self._direct for lang in pair})
        pivoted = [
            self.route(source, target)
            for source in languages
            for target in languages
            if source != target and (source, target) not in self._direct
        ]
        return [route for route in [*direct, *pivoted] if route is not None]
