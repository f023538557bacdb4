# Entry points for humans and CI. `make test` is what CI runs on a fresh Debian 12 machine (as root).
.PHONY: deps bench-deps build lint test demo fuzz bench

CARGO ?= cargo

# Packages, the kvhm-test user and /dev/kvm permissions for the real-parts tests; idempotent.
deps:
	./scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins --tests

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps lint build
	$(CARGO) test --workspace

demo: deps build
	$(CARGO) run -q -p e2e --bin demo

# Each cargo-fuzz target for FUZZ_SECONDS (default 60) seconds; crash inputs become
# regression tests under tests/fuzz/regressions/. Installs cargo-fuzz when missing.
fuzz:
	CARGO=$(CARGO) ./tests/fuzz/run.sh

# `deps` and what only the bench needs: the peer it compares with (prometheus-libvirt-exporter).
bench-deps:
	./scripts/install-deps.sh --bench

# Footprint and latencies of the release binaries on this machine, and the peer side by side,
# printed as tables (docs/performance.md). Not part of `make test`: it takes minutes and
# measures rather than asserts. BENCH_QUICK=1 shortens it to a smoke run;
# BENCH_ONLY=sidecar,detection,aggregator,churn,peer picks parts.
bench: bench-deps
	$(CARGO) build --release -p launcher-sidecar -p node-aggregator
	$(CARGO) run --release -q -p e2e --bin bench
