"""Model families by name: the `family:` key of a model's YAML picks the class here."""
from __future__ import annotations

from niche.errors import ConfigError
from niche.models.families.base import BatchItem, Family
from niche.models.families.flux import FluxFamily
from niche.models.families.kolors import KolorsFamily

FAMILIES: dict[str, type[Family]] = {"flux": FluxFamily, "kolors": KolorsFamily}


def family_class(name: str) -> type[Family]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


__all__ = ["FAMILIES", "BatchItem", "Family", "family_class"]
