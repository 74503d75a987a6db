"""What `make setup` installs besides Python packages.

- s3rver (npm, pinned), the local S3 server behind the durable embedded
  broker (RLHF_BROKER_STORAGE=s3, the default), into $RLHF_MODEL_CACHE;
  once installed this is a no-op.
- Headless Chromium (Debian's `chromium`) drives the playground UI test. It is
installed with apt when missing and when running as root; nothing is ever
downloaded from a browser vendor.
"""

from __future__ import annotations

import os
import shutil
import subprocess

APT_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}


def install_broker_store() -> int:
    from services.common.broker import BrokerUnavailable, s3rver_binary
    from services.common.config import exit_on_config_error, load_settings

    settings = exit_on_config_error(load_settings)
    try:
        print(f"s3rver for the durable broker: {s3rver_binary(settings.model_cache, install=True)}")
    except (BrokerUnavailable, subprocess.CalledProcessError) as err:
        if settings.broker_storage == "s3":
            print(
                f"error: cannot install s3rver for the durable broker ({err});"
                " set RLHF_BROKER_STORAGE=memory to run without it"
            )
            return 1
        print(f"note: s3rver not installed ({err}); only RLHF_BROKER_STORAGE=memory will work")
    return 0


def main() -> int:
    if install_broker_store():
        return 1
    return install_system_packages()


def install_system_packages() -> int:
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
