"""asyncio + aiortc avatar server."""

from __future__ import annotations

# The `serve` extra: import name -> the distribution that provides it (pyproject's [project.optional-dependencies]).
SERVE_EXTRA: dict[str, str] = {"aiortc": "aiortc", "aiohttp": "aiohttp", "webrtcvad": "webrtcvad-wheels", "av": "av"}


def require_serve_extra() -> None:
    """Raise MissingDependency naming the `serve` extra when any of its modules is missing (checked before the
    server starts, so it never comes up half-able to answer offers)."""
    from importlib.util import find_spec

    from engine.errors import MissingDependency

    missing = [dist for mod, dist in SERVE_EXTRA.items() if find_spec(mod) is None]
    if missing:
        raise MissingDependency(
            f"marionette serve needs the `serve` extra, which is not installed (missing: {', '.join(missing)}); "
            "install it with: pip install -e '.[serve]' (from a checkout) or pip install 'marionette[serve]'")
