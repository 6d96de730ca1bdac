# Herald — the two commands a newcomer needs are `make run` and `make test`.
#
# Everything a target needs that the machine may lack (nats-server, the npm SSE
# client) is installed into this repository (bin/, tools/sse-clients/node_modules).

SHELL := /bin/bash
.DEFAULT_GOAL := help

NATS_SERVER_VERSION ?= v2.11.9
# The oldest server line Herald supports (multi-filter consumers, RePublish as
# Herald uses them): the NATS integration tests run against it too.
NATS_OLDEST_VERSION ?= v2.10.29
# A server too old for Herald: the version guard is tested against it.
NATS_TOO_OLD_VERSION ?= v2.9.10
BIN := $(CURDIR)/bin
NATS_SERVER := $(BIN)/nats-server
NATS_OLDEST := $(BIN)/nats-2.10/nats-server
NATS_TOO_OLD := $(BIN)/nats-2.9/nats-server
SSE_CLIENTS := tools/sse-clients
DEV_SECRET ?= herald-dev-secret-change-me-0123456789
LISTEN ?= 127.0.0.1:8080
CARGO ?= cargo

export HERALD_NATS_SERVER := $(NATS_SERVER)
export HERALD_NATS_SERVER_2_9 := $(NATS_TOO_OLD)
export HERALD_SSE_CLIENTS := $(CURDIR)/$(SSE_CLIENTS)

.PHONY: help run test test-nats-oldest test-deps deploy-check chaos chaos-deps chaos-fast chaos-repeat soak churn cluster-up cluster-down lint fmt fuzz nats-server sse-clients loadtest loadtest-all bench-membership bench-tracing bench-baseline baseline-deps bench-allocations bench-interest bench-report clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run: ## Build and start one node on 127.0.0.1:8080 (memory bus, dev secret) and print curl commands
	@$(CARGO) build --release -p herald-edge
	@HERALD__AUTH__HS256_SECRET=$(DEV_SECRET) HERALD__HTTP__LISTEN=$(LISTEN) scripts/quickstart.sh target/release/herald-edge $(LISTEN)

test: test-deps ## Run every test (installs nats-server and the npm SSE client first), then the deployment checks and the fast chaos scenarios
	$(CARGO) test --workspace --locked
	$(CARGO) test -p herald-edge --locked --features heap-stats --lib heap
	$(MAKE) test-nats-oldest
	$(MAKE) deploy-check
	$(MAKE) chaos-fast

test-deps: nats-server sse-clients $(NATS_TOO_OLD)

lint: ## rustfmt check and clippy with -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := sse_parser subject_token last_event_id token_extractor

fuzz: ## Fuzz every network-facing parser for FUZZ_SECONDS each (installs cargo-fuzz)
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O --sanitizer none $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

SCENARIO ?= fanout
SCENARIOS := $(basename $(notdir $(wildcard loadtest/scenarios/*.env)))

loadtest: nats-server ## Run one load scenario: make loadtest SCENARIO=fanout (see loadtest/scenarios/)
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	loadtest/run-scenario.sh $(SCENARIO)

loadtest-all: nats-server ## Run every load scenario, then regenerate the benchmark report
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	@for s in $(SCENARIOS); do loadtest/run-scenario.sh $$s || exit 1; done
	$(MAKE) bench-report

LOAD_SECS ?= 60
# Seconds of each plain and sealed CPU measurement in bench-membership (0 skips it).
CPU_SECS ?= 60

bench-membership: ## Gossip on 5 local nodes (sealed): join, SIGKILL and SIGTERM detection times, false suspicions under full CPU load, CPU of sealed vs plain gossip
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	@mkdir -p loadtest/results
	target/release/membership --edge target/release/herald-edge --rounds 3 --load-secs $(LOAD_SECS) --cpu-secs $(CPU_SECS) --out loadtest/results/membership.json

bench-tracing: ## Measure the cost of delivery tracing: fanout at 100 %, 10 %, 1 % sampling and off
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	@for ratio in 1.0 0.1 0.01; do TRACE_RATIO=$$ratio LABEL=fanout-trace-$$ratio RATE=$${RATE:-5000} loadtest/run-scenario.sh fanout || exit 1; done
	LABEL=fanout-trace-off RATE=$${RATE:-5000} loadtest/run-scenario.sh fanout
	$(MAKE) bench-report

BASELINE_DIR := loadtest/baselines/express-redis
NCHAN_MODULE := /usr/lib/nginx/modules/ngx_nchan_module.so
# The side-by-side rows (issue #20): each runs on Herald (memory bus), Herald
# on NATS JetStream, nchan and Express + Redis, back to back.
BENCH_ROWS ?= idle-5k fanout-2k fanout-10k broadcast-5k broadcast-10k resume-5k

baseline-deps: $(BASELINE_DIR)/node_modules/.installed ## Install the baselines: Express + Redis (npm, redis-server) and nchan (libnginx-mod-nchan)
	@command -v redis-server >/dev/null || (apt-get install -y redis-server || sudo apt-get install -y redis-server)
	@test -f $(NCHAN_MODULE) || (apt-get install -y libnginx-mod-nchan || sudo apt-get install -y libnginx-mod-nchan)

$(BASELINE_DIR)/node_modules/.installed: $(BASELINE_DIR)/package.json $(BASELINE_DIR)/package-lock.json
	cd $(BASELINE_DIR) && npm ci --no-audit --no-fund
	@touch $@

bench-baseline: baseline-deps nats-server ## Run the side-by-side rows on Herald (memory and NATS), nchan and Express + Redis, back to back; the report prints the ratios
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	@for row in $(BENCH_ROWS); do \
	  loadtest/run-scenario.sh $$row || exit 1; \
	  BUS=nats LABEL=$$row-nats loadtest/run-scenario.sh $$row || exit 1; \
	  BASELINE=nchan LABEL=$$row-nchan loadtest/run-scenario.sh $$row || exit 1; \
	  case $$row in resume-*) echo "== $$row: the Express + Redis design has no replay; not run";; \
	    *) BASELINE=express LABEL=$$row-baseline loadtest/run-scenario.sh $$row || exit 1;; esac; \
	done
	$(MAKE) bench-report

bench-interest: nats-server ## Three edges on one nats-server, per-user events: each edge must receive about a third of them (interest routing)
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	loadtest/interest-routing.sh

ALLOC_SCENARIO ?= fanout-10k

bench-allocations: ## Heap allocations per delivered event: ALLOC_SCENARIO (fanout-10k) on a node built with --features count-allocations (apart, in target/count-allocations)
	$(CARGO) build --release -p herald-loadtest
	CARGO_TARGET_DIR=$(CURDIR)/target/count-allocations $(CARGO) build --release -p herald-edge --features count-allocations
	EDGE_BIN=$(CURDIR)/target/count-allocations/release/herald-edge LABEL=$(ALLOC_SCENARIO)-allocations loadtest/run-scenario.sh $(ALLOC_SCENARIO)

bench-report: ## Regenerate the results table in docs/benchmarks.md from loadtest/results/*.json
	python3 loadtest/report.py loadtest/results docs/benchmarks.md

HELM_VERSION ?= v3.16.4
HELM := $(BIN)/helm
DEPLOY_VENV := $(BIN)/deploy-venv
CHART := deploy/helm/herald
# Every values file in ci/ is linted, rendered and validated; every file in
# ci-invalid/ must be refused by the chart's values.schema.json.
CHART_CI := $(wildcard $(CHART)/ci/*-values.yaml)
CHART_INVALID := $(wildcard $(CHART)/ci-invalid/*-values.yaml)
RENDERED := $(BIN)/rendered

deploy-check: $(HELM) $(DEPLOY_VENV)/.installed ## Lint, render and schema-check the Helm chart (every ci/ values file), validate compose, nginx -t, Dockerfile rules
	$(CARGO) build -p herald-edge --locked
	@test -n "$(CHART_CI)" -a -n "$(CHART_INVALID)" || { echo "deploy-check: no values files in $(CHART)/ci or ci-invalid"; exit 1; }
	@rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	@for f in $(CHART_CI); do \
	  echo "helm lint --strict and helm template: $$f"; \
	  $(HELM) lint --strict --quiet $(CHART) -f $$f > $(RENDERED)/lint.log 2>&1 || { cat $(RENDERED)/lint.log; exit 1; }; \
	  $(HELM) template herald $(CHART) --namespace herald -f $$f > $(RENDERED)/$$(basename $$f .yaml).yaml || exit 1; \
	done
	@for f in $(CHART_INVALID); do \
	  if out=$$($(HELM) template herald $(CHART) --namespace herald -f $$f 2>&1); then \
	    echo "deploy-check: helm accepted $$f, which values.schema.json must refuse"; exit 1; fi; \
	  echo "$$out" | grep -q "don't meet the specifications of the schema" \
	    || { echo "deploy-check: $$f was refused, but not by values.schema.json:"; echo "$$out"; exit 1; }; \
	  echo "refused, as it must be: $$f ($$(echo "$$out" | grep -c '^- ') schema errors)"; \
	done
	$(DEPLOY_VENV)/bin/python deploy/check/check.py $(DEPLOY_VENV)/compose_spec.json target/debug/herald-edge $(RENDERED)/*-values.yaml
	deploy/check/nginx.sh
	@# The compose topology as processes (3 NATS, 3 edges, nginx), on ports of its own.
	CLUSTER_DIR=$(CURDIR)/.cluster-check EDGE_BIN=$(CURDIR)/target/debug/herald-edge BASE_PORT=18080 NATS_PORT=14422 GOSSIP_PORT=17946 \
	  bash -c 'deploy/local/cluster.sh down >/dev/null; deploy/local/cluster.sh up >/dev/null && deploy/local/cluster.sh check; status=$$?; deploy/local/cluster.sh down >/dev/null; exit $$status'

CHAOS_FAST := edge-sigkill rolling-restart stream-leader-kill edge-nats-partition gossip-partition reconnect-storm \
  publisher-retries nats-history-rewound chromium-edge-kill chromium-rolling-restart chromium-statuses \
  eventsource-npm clock-skew mixed-targets mixed-targets-leader nats-route-drop client-slow-consumer chromium-revoke

chaos-deps: nats-server sse-clients
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || (apt-get install -y nginx-light || sudo apt-get install -y nginx-light)
	@# Debian's Chromium for the real-browser scenario (never a downloaded browser).
	@[ -x /usr/bin/chromium ] || (apt-get install -y chromium || sudo apt-get install -y chromium)
	@# libfaketime for the clock-skew scenario.
	@[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || [ -n "$$(find /usr/lib -name libfaketime.so.1 2>/dev/null)" ] \
	  || (apt-get install -y libfaketime || sudo apt-get install -y libfaketime)

chaos: chaos-deps ## Fault-injection suite (21 scenarios, ~21 min) through nginx on the local cluster: lost/dup/reordered, recovery, non-200 per scenario
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	chaos/run.sh $(SCENARIOS_CHAOS)

SOAK_SECS ?= 600

soak: chaos-deps ## Steady load with a fault every minute for SOAK_SECS (600); reports lost/dup and RSS/descriptor/live-heap slopes
	$(CARGO) build --release -p herald-loadtest
	@# The edges count their live heap bytes (src/heap.rs): built apart, so the normal build stays as it is.
	CARGO_TARGET_DIR=$(CURDIR)/target/heap-stats $(CARGO) build --release -p herald-edge --features heap-stats
	EDGE_BIN=$(CURDIR)/target/heap-stats/release/herald-edge SOAK_SECS=$(SOAK_SECS) chaos/soak.sh

churn: chaos-deps ## Memory across stream churn: 1000 streams come, replay and go, 12 times; edge RSS after each cycle
	$(CARGO) build --release -p herald-edge -p herald-loadtest
	chaos/churn.sh

chaos-fast: chaos-deps ## The eighteen chaos scenarios make test runs (debug builds, about 17 minutes)
	$(CARGO) build -p herald-edge -p herald-loadtest --locked
	EDGE_BIN=$(CURDIR)/target/debug/herald-edge LOADTEST_BIN=$(CURDIR)/target/debug/herald-loadtest chaos/run.sh $(CHAOS_FAST)

N ?= 5
BUILD ?= release
HOG ?= 0

chaos-repeat: chaos-deps ## Repeat one chaos scenario and print the pass count: make chaos-repeat SCENARIO=mixed-targets-leader N=20 [BUILD=release|debug] [HOG=1]
	$(CARGO) build $(if $(filter debug,$(BUILD)),,--release) -p herald-edge -p herald-loadtest --locked
	BUILD=$(BUILD) HOG=$(HOG) chaos/repeat.sh $(SCENARIO) $(N)

cluster-up: nats-server ## Start the compose topology as local processes: 3 NATS, 3 edges, nginx on 127.0.0.1:8080
	$(CARGO) build --release -p herald-edge
	deploy/local/cluster.sh up

cluster-down: ## Stop what make cluster-up started
	deploy/local/cluster.sh down

$(HELM):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

# deploy/check/requirements.txt from PyPI (jsonschema, PyYAML, kubernetes-validate
# with the Kubernetes API schemas); the Compose specification's JSON schema from
# the pinned docker-compose wheel (not installed, only read).
$(DEPLOY_VENV)/.installed: deploy/check/requirements.txt
	rm -rf $(DEPLOY_VENV)
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check -r deploy/check/requirements.txt
	$(DEPLOY_VENV)/bin/pip download -q --disable-pip-version-check --no-deps docker-compose==1.29.2 -d $(DEPLOY_VENV)/wheels
	$(DEPLOY_VENV)/bin/python -c "import zipfile, glob; z = zipfile.ZipFile(glob.glob('$(DEPLOY_VENV)/wheels/docker_compose-*.whl')[0]); open('$(DEPLOY_VENV)/compose_spec.json', 'wb').write(z.read('compose/config/compose_spec.json'))"
	@touch $@

nats-server: $(NATS_SERVER) ## Install the pinned nats-server into bin/

test-nats-oldest: $(NATS_OLDEST) ## The NATS integration tests against the oldest supported server (2.10)
	HERALD_NATS_SERVER=$(NATS_OLDEST) $(CARGO) test -p herald-edge --locked --test nats_bus --test nats_cluster --test real_clients

$(NATS_OLDEST):
	@command -v go >/dev/null || { echo "Go is required to install nats-server (https://go.dev/dl/)"; exit 1; }
	GOBIN=$(dir $(NATS_OLDEST)) go install github.com/nats-io/nats-server/v2@$(NATS_OLDEST_VERSION)
	@$(NATS_OLDEST) --version

$(NATS_TOO_OLD):
	@command -v go >/dev/null || { echo "Go is required to install nats-server (https://go.dev/dl/)"; exit 1; }
	GOBIN=$(dir $(NATS_TOO_OLD)) go install github.com/nats-io/nats-server/v2@$(NATS_TOO_OLD_VERSION)
	@$(NATS_TOO_OLD) --version

$(NATS_SERVER):
	@command -v go >/dev/null || { echo "Go is required to install nats-server (https://go.dev/dl/)"; exit 1; }
	GOBIN=$(BIN) go install github.com/nats-io/nats-server/v2@$(NATS_SERVER_VERSION)
	@$(NATS_SERVER) --version

sse-clients: $(SSE_CLIENTS)/node_modules/.installed ## Install the npm SSE client used by the real-client tests

$(SSE_CLIENTS)/node_modules/.installed: $(SSE_CLIENTS)/package.json $(SSE_CLIENTS)/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js and npm are required for the real-client tests"; exit 1; }
	cd $(SSE_CLIENTS) && npm ci --no-audit --no-fund
	@touch $@

clean: ## Remove build output and installed tools
	$(CARGO) clean
	rm -rf $(BIN) $(SSE_CLIENTS)/node_modules
