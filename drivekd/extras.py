"""Optional dependencies: the simulator and plotting live in the `drivekd[sim]` extra.

`pip install drivekd` for one's own data pulls no game engine; the commands that need the extra say
so in one line, before any work starts.
"""

from __future__ import annotations

import importlib.util

from drivekd.errors import DriveKDError

SIMULATOR = ("highway_env", "gymnasium")
PLOTTING = ("matplotlib",)


def require(modules: tuple[str, ...], purpose: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise DriveKDError(f"{purpose} needs {', '.join(missing)} (not installed): pip install 'drivekd[sim]'")
