"""Progress bars of the long steps (tqdm on stderr, which a rule's log receives)."""

from __future__ import annotations

from collections.abc import Iterable


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str,
    enabled: bool = True,
):
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand); a no-op when not enabled."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled)
