"""A real browser inside a lab namespace: Debian's headless Chromium driven by Selenium through Debian's
chromedriver, named by path, so nothing is downloaded (Selenium Manager stays offline).

setns() moves only the calling thread, so every browser call runs on one worker thread that entered the
namespace first: chromedriver and Chromium, started from it, live in the namespace too and see the
daemon's dashboard on the namespace's loopback, and they have no way out of the lab.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from awg_split_tunnel.lab.netns import enter_netns

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_problem() -> str | None:
    """Why no lab browser can start here (None: it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"needs {path} (Debian package {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs the selenium Python package (pip install '.[dev]')"
    return None


class LabBrowser:
    """Headless Chromium in namespace `netns`; `call(lambda driver: ...)` runs on its thread."""

    def __init__(self, netns: str, width: int = 1400, height: int = 1000) -> None:
        problem = browser_problem()
        if problem is not None:
            raise RuntimeError(problem)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"browser-{netns}", initializer=enter_netns,
                                        initargs=(netns,))  # fmt: skip
        self._driver: Any = None
        self._driver = self._pool.submit(self._start, width, height).result()

    @staticmethod
    def _start(width: int, height: int) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver or a browser
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # runs as root in the lab
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no DNS: the lab is addressed by IP
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))

    def call(self, action: Callable[[Any], T]) -> T:
        """Run `action(driver)` on the browser's thread; its result or exception."""
        return self._pool.submit(action, self._driver).result()

    def close(self) -> None:
        if self._driver is not None:
            self.call(lambda driver: driver.quit())
            self._driver = None
        self._pool.shutdown()

    def __enter__(self) -> LabBrowser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
