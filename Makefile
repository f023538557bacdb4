# Entry points for humans and CI. `make test` is what CI runs on a fresh Debian 12 machine (as root).
.PHONY: deps build lint test demo

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
