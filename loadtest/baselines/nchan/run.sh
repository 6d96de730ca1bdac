#!/usr/bin/env bash
# Runs nchan (nginx with Debian's libnginx-mod-nchan) on a loopback port from a
# temporary directory, without root, in the foreground: the process is nginx's
# master (its one worker is its child), so the caller stops it with SIGTERM
# (or SIGQUIT to let streams finish) and waits for it.
#
# Usage: loadtest/baselines/nchan/run.sh PORT [DIR]
#   DIR (default: a new temporary directory) receives nginx.conf, the pid file,
#   error.log and nginx's temporary paths.
# Install the module with `make baseline-deps` (apt-get install libnginx-mod-nchan).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${1:?usage: run.sh PORT [DIR]}"
dir="${2:-$(mktemp -d -t herald-nchan.XXXXXX)}"
module="${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}"
nginx="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
[ -x "$nginx" ] || { echo "run.sh: no nginx (make baseline-deps installs it)" >&2; exit 2; }
[ -f "$module" ] || { echo "run.sh: no $module (make baseline-deps installs libnginx-mod-nchan)" >&2; exit 2; }
mkdir -p "$dir"
sed -e "s|@PORT@|$port|g" -e "s|@DIR@|$dir|g" -e "s|@MODULE@|$module|g" \
  "$here/nginx.conf.in" > "$dir/nginx.conf"
# As root, nginx would run its worker as `nobody`; run it as the caller.
if [ "$(id -u)" = 0 ]; then
  sed -i "1i user root root;" "$dir/nginx.conf"
fi
exec "$nginx" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
