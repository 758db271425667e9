#!/usr/bin/env bash
# Install, upgrade, roll back or remove seatwatch on a systemd host; run as root from a git checkout:
#   packaging/install.sh [--python PATH] [--force]    install or upgrade (a new release, checked, then switched)
#   packaging/install.sh --rollback                   back to the release before the current one
#   packaging/install.sh --uninstall | --purge        remove it (--purge: settings, state and user too)
#   packaging/install.sh --which-python               which Python it would build with, and why
#   add --root DIR to stage everything into DIR, recording systemctl/useradd/apt-get instead of running them.
# The work is done by packaging/installer.py, which runs on any python3 >= 3.8; it finds (or installs from
# the distribution's packages) the Python >= 3.11 that seatwatch itself runs on. See docs/operations.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for python in python3 /usr/libexec/platform-python python3.13 python3.12 python3.11; do
    if command -v "$python" >/dev/null 2>&1 \
        && "$python" -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null; then
        exec "$python" "$here/installer.py" "$@"
    fi
done
echo "install.sh: no python3 (3.8 or newer) to run the installer: install python3 first" >&2
exit 1
