#!/usr/bin/env bash
# Builds the binaries of the tests' throwaway control plane (kube-apiserver
# and etcd per Kubernetes release, and helm) from the Go modules beside this
# script, into a per-machine cache outside the repository:
#
#   ${USAGE_BACKFILL_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/usage-backfill-cluster}/<module>/
#
# A module is rebuilt only when its go.mod or go.sum changed since the last
# build (a stamp file records their hash), so a second run is a no-op; Go's
# own build cache makes a rebuild after a version bump cheaper than the first.
#
#   tests/cluster/build.sh                 every module (kube-*, helm)
#   tests/cluster/build.sh kube-1.34 helm  just those
#
# A missing Go toolchain or a failed build exits non-zero with the reason:
# the tests that need these binaries must fail or say they are ignored,
# never pass without them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${USAGE_BACKFILL_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/usage-backfill-cluster}"

say() { printf '[cluster build] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Go may be installed but not on PATH (as in the project's machines).
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null ||
  die "no Go toolchain on PATH (nor /usr/local/go/bin/go); install Go 1.26 or later"

# The toolchain on the machine builds, or the build fails: never a silent
# download of another toolchain. Static binaries, as upstream ships them.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

# Prints a line every 250 compiled packages: `go build -v` names each one,
# and a cold kube-apiserver build compiles a few thousand.
progress() {
  local what=$1 n=0 line
  while IFS= read -r line; do
    case $line in
      # Compiler messages ("file.go:1:2: ...", "# package"), not package paths.
      *:* | '#'*) printf '%s\n' "$line" >&2 ;;
      *)
        n=$((n + 1))
        if [ $((n % 250)) -eq 0 ]; then say "$what: $n packages compiled"; fi
        ;;
    esac
  done
}

# go build with progress; $1 names it in the log, the rest are go build args.
gobuild() {
  local what=$1
  shift
  say "$what: go build $*"
  go build -v -trimpath "$@" 2>&1 | progress "$what" ||
    die "$what: go build failed (output above)"
}

stamp_of() { cat "$1/go.mod" "$1/go.sum" | sha256sum | cut -d' ' -f1; }

build_kube() {
  local mod=$1 dir="$here/$1" out="$cache/$1"
  local version minor
  version="$(cd "$dir" && go list -m -f '{{.Version}}' k8s.io/kubernetes)" ||
    die "$mod: cannot read the k8s.io/kubernetes version from $dir/go.mod"
  minor="${version#v1.}"
  minor="${minor%%.*}"
  # The version the apiserver reports at /version: helm checks a chart's
  # kubeVersion against it, and an unset one reads v0.0.0-master.
  local ldflags="-s -w"
  local v
  for v in gitVersion="$version" gitMajor=1 gitMinor="$minor" \
    gitTreeState=clean buildDate=1970-01-01T00:00:00Z; do
    ldflags+=" -X k8s.io/component-base/version.$v"
  done
  (
    cd "$dir"
    gobuild "$mod kube-apiserver $version" -ldflags="$ldflags" \
      -o "$out/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
    gobuild "$mod etcd" -ldflags="-s -w" -o "$out/etcd" ./etcd
  )
}

build_helm() {
  local dir="$here/helm" out="$cache/helm" version
  version="$(cd "$dir" && go list -m -f '{{.Version}}' helm.sh/helm/v4)" ||
    die "helm: cannot read the helm.sh/helm/v4 version from $dir/go.mod"
  (
    cd "$dir"
    gobuild "helm $version" \
      -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
      -o "$out/helm" helm.sh/helm/v4/cmd/helm
  )
}

modules=("$@")
if [ ${#modules[@]} -eq 0 ]; then
  for d in "$here"/kube-* "$here/helm"; do modules+=("$(basename "$d")"); done
fi

for mod in "${modules[@]}"; do
  [ -f "$here/$mod/go.mod" ] || die "no module $mod under $here"
  out="$cache/$mod"
  want="$(stamp_of "$here/$mod")"
  if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$want" ]; then
    say "$mod: up to date in $out"
    continue
  fi
  say "$mod: building into $out (a first build takes minutes; later runs reuse it)"
  start=$SECONDS
  mkdir -p "$out"
  rm -f "$out/stamp"
  case $mod in
    kube-*) build_kube "$mod" ;;
    helm) build_helm ;;
    *) die "do not know how to build $mod" ;;
  esac
  printf '%s\n' "$want" >"$out/stamp"
  say "$mod: built in $((SECONDS - start)) s ($(du -sh "$out" | cut -f1))"
done
