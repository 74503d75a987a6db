"""System packages that some tests need and pip cannot provide.

Headless Chromium (Debian's `chromium`) drives the playground UI test. It is
installed with apt when missing and when running as root; nothing is ever
downloaded from a browser vendor.
"""

from __future__ import annotations

import os
import shutil
import subprocess

APT_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}


def main() -> int:
    missing = [pkg for binary, pkg in APT_PACKAGES.items() if not shutil.which(binary)]
    if not missing:
        return 0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            f"note: {' '.join(missing)} missing; install them for the browser test"
            f" (apt-get install {' '.join(missing)})"
        )
        return 0
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
