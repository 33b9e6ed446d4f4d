# Bulkhead. `make demo` and `make test` are the two commands a new machine needs
# (as root); everything else they need is installed from here.

SHELL        := /usr/bin/env bash
GO           ?= go
CLANG        ?= clang-19
BIN          := $(CURDIR)/bin
# Builds of large third-party tools live outside the clone, so that fresh
# clones (CI) on the same machine reuse them.
CACHE        ?= /var/cache/bulkhead
CNI_VERSION  := v1.10.0
CNI_BIN      := $(CACHE)/cni-plugins-$(CNI_VERSION)
CNI_PLUGINS  := ptp bridge host-local
# SPIRE for the identity tests, built from the tools module tests/tools/spire
# (its go.mod pins this version). cgo: its sqlite datastore needs gcc.
SPIRE_VERSION := v1.13.3
SPIRE_BIN    := $(CACHE)/spire-$(SPIRE_VERSION)
# kube-apiserver and etcd for the Kubernetes store's apiserver test, built from
# the tools modules tests/tools/k8s and tests/tools/k8s/etcd (their go.mod files
# pin these versions). 10 to 20 minutes and 2.5 GB of RAM on 2 vCPUs, once.
K8S_VERSION  := v1.37.2
ETCD_VERSION := v3.7.4
K8S_BIN      := $(CACHE)/k8s-$(K8S_VERSION)
K8S_LDFLAGS  := -s -w -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
                -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37
# The rest of a real single-node cluster for tests/cluster: kubelet, kubectl,
# kube-controller-manager and kube-scheduler into $(K8S_BIN) beside
# kube-apiserver (from the same tools module; their own marker, so that a
# folder made by k8s-apiserver alone is not taken for a full one), and
# containerd and runc from the tools modules tests/tools/containerd and
# tests/tools/runc (their go.mod files pin these versions).
K8S_CLUSTER_CMDS := kubelet kubectl kube-controller-manager kube-scheduler
CONTAINERD_VERSION := v2.4.2
CONTAINERD_BIN := $(CACHE)/containerd-$(CONTAINERD_VERSION)
RUNC_VERSION := v1.5.2
RUNC_BIN     := $(CACHE)/runc-$(RUNC_VERSION)
# Helm for the chart's tests and for rendering manifests/install.yaml, built
# from the tools module tests/tools/helm (its go.mod pins this version).
HELM_VERSION := v3.22.1
HELM_BIN     := $(CACHE)/helm-$(HELM_VERSION)
HELM         := $(HELM_BIN)/helm
CHART        := manifests/helm/bulkhead
# iperf3 and nsenter (util-linux) run the mTLS benchmarks inside pods;
# socat is their plain relay between the nodes.
APT_PACKAGES := clang-19 llvm-19 libbpf-dev bpftool iproute2 nftables iperf3 ethtool procps gcc util-linux socat \
                libseccomp-dev
BPFFS        := /sys/fs/bpf
# Fuzz targets run this many iterations each in `make test`.
FUZZ_ITERS   ?= 3000
# tests/e2e runs many two-node topologies (the mTLS tests alone: 19, each
# with SPIRE or the built-in CA), one after another: -timeout is per package.
GOTEST_FLAGS ?= -count=1 -timeout 45m

export BULKHEAD_CNI_BIN := $(CNI_BIN)
export BULKHEAD_SPIRE_BIN := $(SPIRE_BIN)
export BULKHEAD_HELM_BIN := $(HELM_BIN)
export BULKHEAD_K8S_BIN := $(K8S_BIN)
export BULKHEAD_CONTAINERD_BIN := $(CONTAINERD_BIN)
export BULKHEAD_RUNC_BIN := $(RUNC_BIN)

.PHONY: all build generate check-generated check-tidy deps bpffs cni-plugins spire helm k8s-apiserver k8s-cluster test test-unit \
        vet staticcheck fuzz bench bench-mtls demo demo-check clean

all: build

## deps: install the Debian packages the build and the tests need.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

## bpffs: make sure the BPF filesystem is mounted (pins live there).
bpffs:
	@mountpoint -q $(BPFFS) || mount -t bpf bpf $(BPFFS)

## generate: regenerate bpf2go output (needs clang-19), the CRD manifests,
## the chart's copy of the CRDs and manifests/install.yaml (needs helm).
# Generation runs in the checkout itself. (It once ran from a fixed symlink
# in /tmp, shared by every clone, for a BTF type order that seemed to follow
# the checkout's path; clang-19 gave the same bytes from five checkout paths
# of different depths and lengths, and check-generated in a fresh clone at
# another path is the standing test of it.)
GEN_RUN   = $(GO) generate ./...
# The chart carries the CRDs in crds/ (Helm installs those first and never
# deletes them), copied from manifests/crds; install.yaml is the chart
# rendered with its default values, for `kubectl apply` users.
GEN_CHART = mkdir -p $(CHART)/crds && rm -f $(CHART)/crds/*.yaml && cp manifests/crds/*.yaml $(CHART)/crds/ && \
	$(HELM) template bulkhead $(CHART) --namespace kube-system --include-crds > manifests/install.yaml.tmp && \
	mv manifests/install.yaml.tmp manifests/install.yaml
generate: helm
	$(GEN_RUN)
	$(GEN_CHART)

## check-generated: fail when the committed generated files are stale.
GENERATED := '*_bpfel.go' '*_bpfel.o' 'manifests/crds/*.yaml' '*zz_generated*.go' \
	'$(CHART)/crds/*.yaml' 'manifests/install.yaml'
check-generated: deps helm
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	git ls-files -- $(GENERATED) | while read -r f; do mkdir -p "$$tmp/$$(dirname $$f)"; cp "$$f" "$$tmp/$$f"; done; \
	$(GEN_RUN) || exit 1; \
	$(GEN_CHART) || exit 1; \
	stale=$$(git ls-files -- $(GENERATED) | while read -r f; do cmp -s "$$f" "$$tmp/$$f" || echo "$$f"; done); \
	new=$$(git ls-files --others --exclude-standard -- $(GENERATED)); \
	if [ -n "$$stale$$new" ]; then echo "stale or uncommitted generated files:" $$stale $$new; \
		echo "run 'make generate' and commit them"; exit 1; fi; \
	echo "generated files are up to date"

## build: the binaries, into bin/, static (CGO_ENABLED=0): bulkhead-cni as the
## reference plugins are (the runtime starts it for every CNI call, and a
## dynamically linked one spends about 0.5 ms more in the loader on each), and
## the agent so that an image from scratch can run it. -trimpath, as the
## cluster tier's image build uses, so that build finds everything cached.
build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

## cni-plugins: the reference CNI plugins and cnitool, built once into $(CACHE).
cni-plugins: $(CNI_BIN)/.done
$(CNI_BIN)/.done:
	@mkdir -p $(CNI_BIN)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && $(GO) mod init cnibuild >/dev/null 2>&1 && \
	  GOFLAGS=-mod=mod $(GO) get github.com/containernetworking/plugins@$(CNI_VERSION) github.com/containernetworking/cni/cnitool@v1.3.1 >/dev/null && \
	  for p in $(CNI_PLUGINS); do \
	    case $$p in host-local) d=ipam/host-local;; *) d=main/$$p;; esac; \
	    GOBIN=$(CNI_BIN) CGO_ENABLED=0 GOFLAGS=-mod=mod $(GO) install github.com/containernetworking/plugins/plugins/$$d || exit 1; \
	  done && \
	  GOBIN=$(CNI_BIN) CGO_ENABLED=0 GOFLAGS=-mod=mod $(GO) install github.com/containernetworking/cni/cnitool
	@touch $@

## spire: spire-server and spire-agent, built once into $(CACHE). The tools
## module must pin SPIRE_VERSION, or the cache folder would lie about its
## content. Running it again over present binaries only relinks (go install
## is a no-op when nothing changed) and writes the marker.
spire: $(SPIRE_BIN)/.done
$(SPIRE_BIN)/.done: | deps
	@grep -Eq '^[[:space:]]*github.com/spiffe/spire $(SPIRE_VERSION)( |$$)' tests/tools/spire/go.mod || \
	  { echo "tests/tools/spire/go.mod does not pin github.com/spiffe/spire $(SPIRE_VERSION)"; exit 1; }
	@mkdir -p $(SPIRE_BIN)
	cd tests/tools/spire && CGO_ENABLED=1 GOBIN=$(SPIRE_BIN) $(GO) install \
	  github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
	@touch $@

## helm: the helm binary, built once into $(CACHE) from tests/tools/helm.
helm: $(HELM)
$(HELM):
	@grep -Eq '^[[:space:]]*helm.sh/helm/v3 $(HELM_VERSION)( |$$)' tests/tools/helm/go.mod || \
	  { echo "tests/tools/helm/go.mod does not pin helm.sh/helm/v3 $(HELM_VERSION)"; exit 1; }
	@mkdir -p $(HELM_BIN)
	cd tests/tools/helm && CGO_ENABLED=0 GOBIN=$(HELM_BIN) $(GO) install \
	  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION)" helm.sh/helm/v3/cmd/helm

## k8s-apiserver: kube-apiserver and etcd, built once into $(K8S_BIN). The
## tools modules must pin the versions, or the cache folder would lie about
## its content. BULKHEAD_K8S_BIN=$(K8S_BIN) runs agent/k8s's apiserver test.
k8s-apiserver: $(K8S_BIN)/.done
$(K8S_BIN)/.done:
	@grep -Eq '^(require)?[[:space:]]*k8s.io/kubernetes $(K8S_VERSION)( |$$)' tests/tools/k8s/go.mod || \
	  { echo "tests/tools/k8s/go.mod does not pin k8s.io/kubernetes $(K8S_VERSION)"; exit 1; }
	@grep -Eq '^(require)?[[:space:]]*go.etcd.io/etcd/server/v3 $(ETCD_VERSION)( |$$)' tests/tools/k8s/etcd/go.mod || \
	  { echo "tests/tools/k8s/etcd/go.mod does not pin go.etcd.io/etcd/server/v3 $(ETCD_VERSION)"; exit 1; }
	@mkdir -p $(K8S_BIN)
	cd tests/tools/k8s/etcd && CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' \
	  -o $(K8S_BIN)/etcd go.etcd.io/etcd/server/v3
	cd tests/tools/k8s && CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(K8S_LDFLAGS)' \
	  -o $(K8S_BIN)/kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
	@touch $@

## k8s-cluster: everything tests/cluster runs, built once each: kube-apiserver
## and etcd (k8s-apiserver), kubelet, kubectl, kube-controller-manager and
## kube-scheduler into $(K8S_BIN), containerd with ctr and its runc shim into
## $(CONTAINERD_BIN), runc into $(RUNC_BIN); and the CNI plugins and helm it
## also runs.
k8s-cluster: $(K8S_BIN)/.cluster-done $(CONTAINERD_BIN)/.done $(RUNC_BIN)/.done cni-plugins helm
$(K8S_BIN)/.cluster-done: | $(K8S_BIN)/.done
	@grep -Eq '^(require)?[[:space:]]*k8s.io/kubernetes $(K8S_VERSION)( |$$)' tests/tools/k8s/go.mod || \
	  { echo "tests/tools/k8s/go.mod does not pin k8s.io/kubernetes $(K8S_VERSION)"; exit 1; }
	cd tests/tools/k8s && CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(K8S_LDFLAGS)' \
	  -o $(K8S_BIN)/ $(addprefix k8s.io/kubernetes/cmd/,$(K8S_CLUSTER_CMDS))
	@touch $@
$(CONTAINERD_BIN)/.done:
	@grep -Eq '^(require)?[[:space:]]*github.com/containerd/containerd/v2 $(CONTAINERD_VERSION)( |$$)' tests/tools/containerd/go.mod || \
	  { echo "tests/tools/containerd/go.mod does not pin github.com/containerd/containerd/v2 $(CONTAINERD_VERSION)"; exit 1; }
	@mkdir -p $(CONTAINERD_BIN)
	cd tests/tools/containerd && CGO_ENABLED=0 $(GO) build -trimpath -tags no_btrfs \
	  -ldflags '-s -w -X github.com/containerd/containerd/v2/version.Version=$(CONTAINERD_VERSION)' -o $(CONTAINERD_BIN)/ \
	  $(addprefix github.com/containerd/containerd/v2/cmd/,containerd ctr containerd-shim-runc-v2)
	@touch $@
$(RUNC_BIN)/.done: | deps
	@grep -Eq '^(require)?[[:space:]]*github.com/opencontainers/runc $(RUNC_VERSION)( |$$)' tests/tools/runc/go.mod || \
	  { echo "tests/tools/runc/go.mod does not pin github.com/opencontainers/runc $(RUNC_VERSION)"; exit 1; }
	@mkdir -p $(RUNC_BIN)
	cd tests/tools/runc && CGO_ENABLED=1 $(GO) build -trimpath -tags 'seccomp urfave_cli_no_docs' \
	  -ldflags '-s -w -X main.version=$(patsubst v%,%,$(RUNC_VERSION))' -o $(RUNC_BIN)/runc github.com/opencontainers/runc
	@touch $@

vet:
	$(GO) vet ./...

## check-tidy: fail when go.mod or go.sum is not what `go mod tidy` makes.
check-tidy:
	@d=$$($(GO) mod tidy -diff) || { echo "go.mod/go.sum are not tidy: run go mod tidy"; echo "$$d"; exit 1; }

staticcheck:
	$(GO) tool staticcheck ./...

## fuzz: every fuzz target, a bounded number of iterations each.
fuzz: deps bpffs
	@set -e; for pkg in $$($(GO) list ./...); do \
		dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
		for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | cut -d' ' -f2 | sort -u); do \
			echo "fuzz $$pkg $$f ($(FUZZ_ITERS) iterations)"; \
			BULKHEAD_PRIVILEGED=1 $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZ_ITERS)x $$pkg; \
		done; \
	done

## test: every tier (pure Go, kernel, end-to-end) as root, plus the checks.
test: deps bpffs check-generated check-tidy cni-plugins spire helm k8s-apiserver k8s-cluster build vet staticcheck
	BULKHEAD_PRIVILEGED=1 $(GO) test $(GOTEST_FLAGS) ./...
	$(MAKE) fuzz
	$(MAKE) demo-check

## demo-check: run `make demo` as a user does, then assert it left nothing behind.
demo-check:
	@had_rule=$$(ip rule list | grep -c 'lookup 2008' || true); \
	$(MAKE) --no-print-directory demo > $(CURDIR)/bin/demo.log 2>&1 || { cat $(CURDIR)/bin/demo.log; exit 1; }; \
	tail -n 1 $(CURDIR)/bin/demo.log; \
	left=""; \
	[ "$$had_rule" = 0 ] && ip rule list | grep -q 'lookup 2008' && left="$$left tunnel-rule:fwmark-0xb00"; \
	ls -d $(BPFFS)/bulkhead-demo-* >/dev/null 2>&1 && left="$$left pins:$$(ls -d $(BPFFS)/bulkhead-demo-*)"; \
	ls /run/netns 2>/dev/null | grep -q '^bh-' && left="$$left netns:$$(ls /run/netns | grep '^bh-' | tr '\n' ' ')"; \
	pgrep -f '[-]-bpffs $(BPFFS)/bulkhead-demo-' >/dev/null && left="$$left process:bulkhead-agent"; \
	ip -o link show type veth 2>/dev/null | grep -q . && ip -o addr show 2>/dev/null | grep -q '10\.213\.25[0-4]\.' && left="$$left addresses:10.213.250-254"; \
	if [ -n "$$left" ]; then echo "make demo left behind:$$left"; exit 1; fi; \
	echo "make demo left nothing behind"

## bench: every benchmark (BenchmarkDatapath pins its own thread to one CPU).
bench: deps bpffs cni-plugins spire build
	BULKHEAD_PRIVILEGED=1 $(GO) test -run '^$$' -bench . -benchmem ./...

## bench-mtls: issue 12's benchmarks only (two nodes, built-in CA, iperf3),
## once each; BULKHEAD_BENCH_SECONDS sets each throughput run (default 5).
bench-mtls: deps bpffs cni-plugins build
	BULKHEAD_PRIVILEGED=1 $(GO) test -run '^$$' -bench 'BenchmarkMTLS' -benchtime 1x -timeout 30m ./tests/e2e/

## demo: the embedded-default demo (no Kubernetes, no SPIRE). DEMO_FLAGS=--keep
## leaves the agent and the pods running for exploring.
demo: deps bpffs cni-plugins build
	$(BIN)/bulkhead demo --cni-bin $(CNI_BIN) --bin-dir $(BIN) $(DEMO_FLAGS)

clean:
	rm -rf $(BIN)
