"""pyroute2 0.9 resets the level of its ``pyroute2`` logger to 0 (NOTSET) when it is first imported.

Shows: ``logging.getLogger("pyroute2").setLevel(logging.WARNING)`` done before pyroute2 is imported is
undone by the import (``pyroute2/config/log.py``), so at a DEBUG root level every netlink message is
logged (``await data on ...``, ``message {...}``) and floods a debug log. Consequence: the router
process filters library records below WARNING on its handlers (``router/process.py``
``LibraryDebugFilter``) instead of counting on the logger's level. No root needed:
python3 scripts/repro/pyroute2_log_level.py
"""

from __future__ import annotations

import logging


def main() -> None:
    logger = logging.getLogger("pyroute2")
    logger.setLevel(logging.WARNING)
    before = logging.getLevelName(logger.level)
    import pyroute2  # noqa: F401  (the import is what resets the level)

    after = logging.getLevelName(logger.level)
    print(f"pyroute2 logger level set before the import: {before}; after the import: {after}")


if __name__ == "__main__":
    main()
