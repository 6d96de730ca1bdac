# Shared by chaos/run.sh, soak.sh, churn.sh and chaos/scenarios/*.sh (sourced
# from the repository root, after the caller set CLUSTER_DIR, BASE_PORT,
# NATS_PORT and GOSSIP_PORT): the binaries, the secret, where results go, the
# local cluster script, and the load generator as the chaos runs use it.
export EDGE_BIN=${EDGE_BIN:-$PWD/target/release/herald-edge}
export LOADTEST_BIN=${LOADTEST_BIN:-$PWD/target/release/herald-loadtest}
export RUST_LOG=${RUST_LOG:-warn}
export HERALD_SECRET=${HERALD_SECRET:-herald-dev-secret-change-me-0123456789}
export RESULTS=${RESULTS:-$PWD/loadtest/results/chaos}
export cluster=$PWD/deploy/local/cluster.sh
NATS_URLS="nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))"
mkdir -p "$RESULTS"

# The load generator: CONNECTIONS clients through nginx that resume like
# browsers (honour `retry:`, send Last-Event-ID), RATE events/s published into
# JetStream by 4 publishers. Further options (--label, --duration, --drain,
# --out, …) are the caller's; a later option overrides an earlier one.
loadgen() {
  "$LOADTEST_BIN" --url "http://127.0.0.1:$BASE_PORT" --nats "$NATS_URLS" --secret "$HERALD_SECRET" \
    --connections "$CONNECTIONS" --users "$CONNECTIONS" --rate "$RATE" --publishers 4 \
    --reconnect 1 --honor-retry 1 "$@"
}
