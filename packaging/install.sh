#!/usr/bin/env bash
# Install or upgrade seatwatch on a Debian/Ubuntu host (run as root from a checkout):
#   /opt/seatwatch (code and .venv), the seatwatch system user, /etc/seatwatch (settings and credentials),
#   the systemd unit. Re-running upgrades the code and keeps the settings. Start with:
#   systemctl enable --now seatwatch
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/seatwatch
etc=/etc/seatwatch

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
id seatwatch >/dev/null 2>&1 || useradd --system --home-dir "$prefix" --shell /usr/sbin/nologin seatwatch

install -d -m 0755 "$prefix"
cp -a "$src/pyproject.toml" "$src/README.md" "$src/daemon" "$prefix/"
[ -x "$prefix/.venv/bin/python" ] || python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/python" -m pip install --quiet --upgrade "$prefix"

install -d -m 0755 "$etc"
install -d -m 0700 "$etc/credentials"
[ -f "$etc/seatwatch.env" ] || install -m 0644 "$src/packaging/seatwatch.env" "$etc/seatwatch.env"
for name in database_url redis_url scraper_secret_token resend_api_key supabase_service_role_key; do
    [ -f "$etc/credentials/$name" ] || echo "missing: $etc/credentials/$name (one secret per file, mode 0600)"
done

install -m 0644 "$src/seatwatch.service" /etc/systemd/system/seatwatch.service
systemctl daemon-reload
echo "installed; check the settings with: sudo -u seatwatch env \$(cat $etc/seatwatch.env | xargs) $prefix/.venv/bin/seatwatch check"
