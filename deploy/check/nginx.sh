#!/usr/bin/env bash
# `nginx -t` on the nginx configurations Herald ships, offline: the compose
# upstreams (edge-N:8080, resolved only inside compose's network) are pointed
# at loopback, and the shared SSE directives are included from the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -e 's/edge-\([0-9]\):8080/127.0.0.1:808\1/' \
    -e "s|/etc/nginx/herald/sse-proxy.conf|$PWD/deploy/nginx/sse-proxy.conf|" \
    deploy/compose/nginx/herald.conf > "$tmp/herald.conf"
cat > "$tmp/nginx.conf" <<CONF
pid $tmp/nginx.pid;
error_log stderr;
events {}
http {
    access_log off;
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    include $tmp/herald.conf;
}
CONF
"$nginx_bin" -t -q -p "$tmp" -c "$tmp/nginx.conf"
echo "deploy-check: nginx accepts deploy/compose/nginx/herald.conf with deploy/nginx/sse-proxy.conf"
