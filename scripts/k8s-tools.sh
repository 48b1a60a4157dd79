#!/usr/bin/env bash
# k8s-tools.sh — build (or reuse) the Kubernetes control-plane binaries that
# Riverbed's local k8s tests need, cached OUTSIDE the repository:
#
#   kube-apiserver  v1.37.2  built from the Go module proxy
#   etcd            3.4.23   extracted from Debian's etcd-server package
#   KubeRay operator v1.7.0  built from the Go module proxy
#                            (github.com/ray-project/kuberay/ray-operator)
#
# Layout: ${RIVERBED_CACHE:-$HOME/.cache/riverbed}/k8s/<name>-<version>/<binary>
#         ${RIVERBED_CACHE:-$HOME/.cache/riverbed}/k8s/go-mod   (GOMODCACHE)
#         ${RIVERBED_CACHE:-$HOME/.cache/riverbed}/k8s/go-build (GOCACHE)
#
# Usage:
#   scripts/k8s-tools.sh paths
#       Print KUBE_APISERVER=... ETCD=... KUBERAY_OPERATOR=... (only the
#       binaries that exist) on one line; always exits 0.
#   scripts/k8s-tools.sh build [apiserver|etcd|server|operator|all]   (default: all)
#       Build whatever is missing, skip what is cached, then print the paths
#       (server: etcd and kube-apiserver, what `make test` builds).
#       Progress goes to stderr.
#
# Environment:
#   RIVERBED_CACHE  cache root (default: $HOME/.cache/riverbed)
#   GO              go binary (default: /usr/local/go/bin/go, else go on PATH)
#   KUBERAY_SRC     fallback source for the operator when the module proxy
#                   refuses to serve the v1.7.0 zip: a kuberay git repository
#                   (bare or not) that contains commit $KUBERAY_COMMIT.
#                   The extracted tree must match the v1.7.0 go.sum hash.
#
# Builds run under `nice -n 19`. Every binary is written to a temporary name
# and then renamed into place, so an interrupted build never leaves a
# half-written binary behind (a rerun simply builds it again).

set -euo pipefail

# ---------------------------------------------------------------------------
# Pinned versions
# ---------------------------------------------------------------------------
readonly KUBE_VERSION="v1.37.2"
readonly ETCD_VERSION="3.4.23"
readonly KUBERAY_VERSION="v1.7.0"
# Commit behind the ray-operator/v1.7.0 tag (2026-08-20).
readonly KUBERAY_COMMIT="59d663aeec13760646da3db9c1cf8cfe883e30b7"
readonly KUBERAY_MODULE="github.com/ray-project/kuberay/ray-operator"

# ---------------------------------------------------------------------------
# Cache layout
# ---------------------------------------------------------------------------
readonly CACHE_ROOT="${RIVERBED_CACHE:-$HOME/.cache/riverbed}/k8s"
readonly APISERVER_DIR="$CACHE_ROOT/kube-apiserver-$KUBE_VERSION"
readonly ETCD_DIR="$CACHE_ROOT/etcd-$ETCD_VERSION"
readonly OPERATOR_DIR="$CACHE_ROOT/kuberay-operator-$KUBERAY_VERSION"
readonly APISERVER_BIN="$APISERVER_DIR/kube-apiserver"
readonly ETCD_BIN="$ETCD_DIR/etcd"
readonly OPERATOR_BIN="$OPERATOR_DIR/kuberay-operator"
readonly TMP_ROOT="$CACHE_ROOT/tmp"

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
log() { printf '[k8s-tools %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Temporary paths registered here are removed when the script exits,
# whether it succeeds, fails or is interrupted.
CLEANUP_PATHS=()
cleanup() {
    local p
    for p in "${CLEANUP_PATHS[@]+"${CLEANUP_PATHS[@]}"}"; do
        rm -rf -- "$p"
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# make_tmpdir VAR PREFIX — create a temp dir under the cache, register it for
# cleanup and store its path in VAR (not via $(...), so the registration
# happens in this shell rather than in a subshell).
make_tmpdir() {
    local -n _out="$1"
    mkdir -p "$TMP_ROOT"
    _out="$(mktemp -d "$TMP_ROOT/$2.XXXXXX")"
    CLEANUP_PATHS+=("$_out")
}

# install_atomic SRC DEST — move a finished binary into place atomically
# (same filesystem: copy next to DEST first, then rename).
install_atomic() {
    local src="$1" dest="$2" part
    mkdir -p "$(dirname "$dest")"
    part="$dest.partial.$$"
    CLEANUP_PATHS+=("$part")
    cp -- "$src" "$part"
    chmod 0755 "$part"
    mv -f -- "$part" "$dest"
}

# Go environment: everything (module + build caches) lives under the cache.
setup_go() {
    if [[ -z "${GO:-}" ]]; then
        if [[ -x /usr/local/go/bin/go ]]; then
            GO=/usr/local/go/bin/go
        else
            GO="$(command -v go)" || die "go not found (set GO=/path/to/go)"
        fi
    fi
    export GOMODCACHE="$CACHE_ROOT/go-mod"
    export GOCACHE="$CACHE_ROOT/go-build"
    # -modcacherw keeps the module cache deletable with a plain `rm -rf`.
    export GOFLAGS="${GOFLAGS:+$GOFLAGS }-modcacherw -buildvcs=false"
    export GOWORK=off          # never pick up a go.work from the caller
    export GO111MODULE=on
    export CGO_ENABLED="${CGO_ENABLED:-0}"
    mkdir -p "$GOMODCACHE" "$GOCACHE"
}

# go_json_field JSON FIELD — read one top-level string field of `go ... -json`
# output (avoids depending on jq).
go_json_field() {
    python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ""))' "$1" "$2"
}

# ---------------------------------------------------------------------------
# 1. kube-apiserver
# ---------------------------------------------------------------------------
# k8s.io/kubernetes's go.mod replaces every staging module with ./staging/...,
# and those directories are not part of the module zip, so
# `go install k8s.io/kubernetes/cmd/kube-apiserver@vX` fails. Instead build
# from a throwaway wrapper module that requires k8s.io/kubernetes and pins
# each staging module to its published v0.<minor>.<patch> release.
build_apiserver() {
    if [[ -x "$APISERVER_BIN" ]]; then
        log "kube-apiserver $KUBE_VERSION: cached at $APISERVER_BIN"
        return 0
    fi
    setup_go
    local start=$SECONDS work dl gomod staging_version minor mod
    local -a staging=()
    log "kube-apiserver $KUBE_VERSION: building (about 10 min on 2 idle cores, 3.4 GB of Go caches)"

    # Staging modules are versioned v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
    staging_version="v0.${KUBE_VERSION#v1.}"
    minor="${KUBE_VERSION#v1.}"
    minor="${minor%%.*}"

    # Derive the staging module list from the upstream go.mod.
    dl="$(cd / && "$GO" mod download -json "k8s.io/kubernetes@$KUBE_VERSION")"
    gomod="$(go_json_field "$dl" GoMod)"
    [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION: $(go_json_field "$dl" Error)"
    mapfile -t staging < <(sed -nE 's#^[[:space:]]*([^[:space:]]+)[[:space:]]+=>[[:space:]]+\./staging/.*#\1#p' "$gomod" | sort -u)
    ((${#staging[@]} > 0)) || die "no ./staging replaces found in $gomod"
    log "kube-apiserver: ${#staging[@]} staging modules pinned to $staging_version"

    make_tmpdir work apiserver
    (
        cd "$work"
        {
            echo "module riverbed.local/k8s-apiserver-wrapper"
            echo
            echo "go $("$GO" env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/')"
            echo
            echo "require k8s.io/kubernetes $KUBE_VERSION"
            echo
            echo "replace ("
            for mod in "${staging[@]}"; do
                echo "	$mod => $mod $staging_version"
            done
            echo ")"
        } >go.mod
        cat >tools.go <<'EOF'
//go:build tools

// Package tools only exists so that `go mod tidy` records every dependency
// of the kube-apiserver command in this wrapper module.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"
EOF
        log "kube-apiserver: go mod tidy"
        nice -n 19 "$GO" mod tidy >&2
        log "kube-apiserver: go build"
        nice -n 19 "$GO" build -trimpath \
            -ldflags "-s -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
            -o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
    )
    install_atomic "$work/kube-apiserver" "$APISERVER_BIN"
    log "kube-apiserver: done in $((SECONDS - start))s -> $APISERVER_BIN"
}

# ---------------------------------------------------------------------------
# 2. etcd (from the Debian etcd-server package, extracted, not installed)
# ---------------------------------------------------------------------------
build_etcd() {
    if [[ -x "$ETCD_BIN" ]]; then
        log "etcd $ETCD_VERSION: cached at $ETCD_BIN"
        return 0
    fi
    local start=$SECONDS work deb found version
    log "etcd $ETCD_VERSION: fetching Debian package etcd-server"
    make_tmpdir work etcd
    (
        cd "$work"
        # apt-get download works unprivileged and installs nothing; only
        # refresh the package lists if the first attempt fails.
        if ! apt-get download etcd-server >&2; then
            log "etcd: apt-get download failed; running apt-get update and retrying"
            apt-get update >&2
            apt-get download etcd-server >&2
        fi
    )
    deb="$(find "$work" -maxdepth 1 -name 'etcd-server_*.deb' -print -quit)"
    [[ -n "$deb" ]] || die "etcd: no etcd-server .deb downloaded"
    case "$(basename "$deb")" in
        etcd-server_"$ETCD_VERSION"[-+]*) ;;
        *) die "etcd: expected etcd-server $ETCD_VERSION, got $(basename "$deb")" ;;
    esac
    dpkg -x "$deb" "$work/root"
    # Take usr/bin/etcd explicitly: the package also ships an executable
    # /etc/init.d/etcd (a 571-byte init script) that a name search would find.
    found="$work/root/usr/bin/etcd"
    [[ -f "$found" && -x "$found" ]] || die "etcd: no usr/bin/etcd inside $(basename "$deb")"
    version="$("$found" --version 2>&1 | sed -nE 's/^etcd Version: *//p')"
    [[ "$version" == "$ETCD_VERSION" ]] ||
        die "etcd: $(basename "$deb") reports version '${version:-?}', expected $ETCD_VERSION"
    install_atomic "$found" "$ETCD_BIN"
    log "etcd: done in $((SECONDS - start))s ($(basename "$deb")) -> $ETCD_BIN"
}

# ---------------------------------------------------------------------------
# 3. KubeRay operator
# ---------------------------------------------------------------------------
# Preferred source: the module proxy at $KUBERAY_VERSION (tag
# ray-operator/v1.7.0 == $KUBERAY_COMMIT), else the pseudo-version of
# $KUBERAY_COMMIT. ray-operator's go.mod has no replace directives and its
# main package is the module root (main.go), so `go install module@version`
# works directly.
#
# Gotcha: proxy.golang.org lists/serves the v1.7.0 .info and .mod but answers
# 403 "This module version is not available." for the source zip (checked
# 2026-12-05). Fallback: extract ray-operator/ at $KUBERAY_COMMIT from a
# kuberay git repository given in $KUBERAY_SRC, and refuse to build unless the
# tree hashes to the checksum-database hash of v1.7.0 below, i.e. it is
# byte-for-byte the module the proxy would have served.
readonly KUBERAY_H1="h1:Yt/5N7vBQACL81UEF4A192btVfczHNJ4PFlebj6mvsw="

operator_ldflags() {
    printf '%s' "-s -X main._commitId_=$KUBERAY_COMMIT -X main._buildTime_=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

# resolve_operator_version — print a proxy version whose source zip is
# downloadable, or nothing.
resolve_operator_version() {
    local q dl ver err
    for q in "$KUBERAY_VERSION" "$KUBERAY_COMMIT"; do
        # `go list -m` resolves a commit to its canonical (pseudo-)version.
        ver="$(cd / && "$GO" list -m -f '{{.Version}}' "$KUBERAY_MODULE@$q" 2>/dev/null)" || continue
        # `go mod download -json` exits non-zero on error but still prints JSON.
        dl="$(cd / && "$GO" mod download -json "$KUBERAY_MODULE@$ver" 2>/dev/null)" || true
        err="$(go_json_field "${dl:-"{}"}" Error | head -n 1)"
        if [[ -z "$err" && -d "$(go_json_field "$dl" Dir)" ]]; then
            printf '%s\n' "$ver"
            return 0
        fi
        log "operator: proxy resolves $KUBERAY_MODULE@$q -> $ver but will not serve its source: ${err:-no source dir}"
    done
    return 0
}

# module_h1 DIR MODULE@VERSION — the go.sum "h1:" hash (golang.org/x/mod
# dirhash.Hash1) of a module tree: sha256 over the sorted lines
# "<sha256 hex>  <module@version/relpath>\n" of every regular file.
module_h1() {
    python3 - "$1" "$2" <<'PY'
import base64, hashlib, os, sys
root, prefix = sys.argv[1], sys.argv[2] + "/"
files = {}
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p):
            files[prefix + os.path.relpath(p, root)] = p
summary = "".join(
    "%s  %s\n" % (hashlib.sha256(open(files[k], "rb").read()).hexdigest(), k)
    for k in sorted(files)
)
print("h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode())
PY
}

build_operator() {
    if [[ -x "$OPERATOR_BIN" ]]; then
        log "KubeRay operator $KUBERAY_VERSION: cached at $OPERATOR_BIN"
        return 0
    fi
    setup_go
    local start=$SECONDS work ver src h1
    log "KubeRay operator $KUBERAY_VERSION: resolving $KUBERAY_MODULE"
    ver="$(resolve_operator_version)"
    make_tmpdir work operator

    if [[ -n "$ver" ]]; then
        log "operator: building $KUBERAY_MODULE@$ver from the module proxy"
        (
            cd "$work"
            GOBIN="$work/bin" nice -n 19 "$GO" install -trimpath \
                -ldflags "$(operator_ldflags)" "$KUBERAY_MODULE@$ver"
        )
        install_atomic "$work/bin/ray-operator" "$OPERATOR_BIN"
    else
        [[ -n "${KUBERAY_SRC:-}" ]] ||
            die "operator: the module proxy does not serve $KUBERAY_MODULE@$KUBERAY_VERSION; set KUBERAY_SRC to a kuberay git repository containing $KUBERAY_COMMIT and rerun"
        git -C "$KUBERAY_SRC" cat-file -e "$KUBERAY_COMMIT^{commit}" 2>/dev/null ||
            die "operator: $KUBERAY_SRC is not a git repository containing $KUBERAY_COMMIT"
        log "operator: extracting ray-operator/ at $KUBERAY_COMMIT from $KUBERAY_SRC"
        mkdir -p "$work/src"
        # stderr is dropped: a partial mirror may complain about blobs outside
        # ray-operator/; the hash check below catches anything actually missing.
        git -C "$KUBERAY_SRC" archive "$KUBERAY_COMMIT" ray-operator 2>/dev/null | tar -x -C "$work/src"
        src="$work/src/ray-operator"
        # Like the go command, give a subdirectory module the repo-root
        # LICENSE when it has none of its own (part of the module zip/hash).
        if [[ ! -e "$src/LICENSE" ]]; then
            git -C "$KUBERAY_SRC" show "$KUBERAY_COMMIT:LICENSE" >"$src/LICENSE" 2>/dev/null || rm -f "$src/LICENSE"
        fi
        h1="$(module_h1 "$src" "$KUBERAY_MODULE@$KUBERAY_VERSION")"
        [[ "$h1" == "$KUBERAY_H1" ]] ||
            die "operator: source at $KUBERAY_COMMIT hashes to $h1, expected $KUBERAY_H1 ($KUBERAY_MODULE@$KUBERAY_VERSION)"
        log "operator: source verified ($h1 == go.sum hash of $KUBERAY_VERSION); building"
        # Dependencies still come from the proxy, verified against go.sum.
        (
            cd "$src"
            nice -n 19 "$GO" build -mod=readonly -trimpath \
                -ldflags "$(operator_ldflags)" -o "$work/ray-operator" .
        )
        install_atomic "$work/ray-operator" "$OPERATOR_BIN"
    fi
    log "operator: done in $((SECONDS - start))s -> $OPERATOR_BIN"
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------
print_paths() {
    local -a out=()
    [[ -x "$APISERVER_BIN" ]] && out+=("KUBE_APISERVER=$APISERVER_BIN")
    [[ -x "$ETCD_BIN" ]] && out+=("ETCD=$ETCD_BIN")
    [[ -x "$OPERATOR_BIN" ]] && out+=("KUBERAY_OPERATOR=$OPERATOR_BIN")
    echo "${out[*]+"${out[*]}"}"
}

usage() {
    sed -nE '/^# Usage:/,/^# Environment:/{/^# Environment:/d;s/^# ?//p}' "$0" >&2
    exit 2
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        paths)
            print_paths
            ;;
        build)
            case "${2:-all}" in
                apiserver) build_apiserver ;;
                etcd) build_etcd ;;
                server)
                    build_etcd
                    build_apiserver
                    ;;
                operator) build_operator ;;
                all)
                    # Each target runs in its own process (with its own
                    # `set -e`), cheapest first, so one failure does not
                    # hold the others back; the exit status reports it.
                    local target rc=0
                    for target in etcd operator apiserver; do
                        "${BASH_SOURCE[0]}" build "$target" >/dev/null || {
                            log "build $target FAILED"
                            rc=1
                        }
                    done
                    print_paths
                    return "$rc"
                    ;;
                *) usage ;;
            esac
            print_paths
            ;;
        *) usage ;;
    esac
}

main "$@"
