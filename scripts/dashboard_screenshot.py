"""Take docs/dashboard.png: `awg-split-tunnel demo --ui`, then headless Chromium in the demo's client
namespace, the picture taken once the page's throughput charts have 45 s of history (Linux, root,
Debian's chromium and chromium-driver). Usage: sudo python3 scripts/dashboard_screenshot.py [OUT.png]"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from awg_split_tunnel.lab.browser import LabBrowser

HISTORY = 45.0
"""Seconds the page is open before the picture: its charts are drawn from what it saw."""
WIDTH, HEIGHT = 1400, 1500


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png").resolve()
    demo = subprocess.Popen(
        [sys.executable, "-m", "awg_split_tunnel", "demo", "--ui"], stdout=subprocess.PIPE, text=True
    )
    assert demo.stdout is not None
    prefix = url = None
    for line in demo.stdout:
        found = re.search(r"/tmp/([a-z0-9]+)-[^/]+/config\.yaml", line)
        prefix = prefix or (found.group(1) if found else None)
        if line.startswith("dashboard:"):
            url = line.split(":", 1)[1].strip()
            break
    if prefix is None or url is None:
        print("the demo did not start its dashboard", file=sys.stderr)
        return 1
    try:
        with LabBrowser(f"{prefix}-client", WIDTH, HEIGHT) as browser:
            browser.call(lambda driver: driver.get(url))
            time.sleep(HISTORY)
            browser.call(lambda driver: driver.save_screenshot(str(out)))
        print(f"wrote {out}")
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
