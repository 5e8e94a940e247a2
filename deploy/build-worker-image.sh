#!/usr/bin/env bash
# Builds the real AnyWork worker image without a container registry: nothing is pulled.
#
#   deploy/build-worker-image.sh [WORKER_BINARY] [TAG]
#
# The image is a Debian bookworm minimal root (`debootstrap --variant=minbase`, from the mirror
# this machine's apt sources name) with bash, coreutils, git, ca-certificates, curl, ripgrep,
# procps and less; the `anywork-worker` binary; and the Claude Code CLI (`claude`, from the
# claude-agent-sdk wheel: `pip install claude-agent-sdk`). It is loaded with `docker import`,
# runs as uid 10001 in /workspace, and listens on 0.0.0.0:8080.
#
# WORKER_BINARY defaults to $CARGO_TARGET_DIR/release/anywork-worker (or target/release/…),
# TAG to anywork-worker:latest (the Docker driver's default DOCKER_WORKER_IMAGE).
# Environment:
#   CLAUDE_BIN     the claude CLI to put in (default: the claude-agent-sdk wheel's, else `claude`
#                  on PATH); WITH_CLAUDE=0 builds an image without it (native executor only).
#   DEBIAN_MIRROR  the Debian mirror (default: the first one in /etc/apt/sources*).
#   ANYWORK_CACHE  where the Debian root is cached between builds (default ~/.cache/anywork).
# Needs root (debootstrap; sudo is used when available), docker, and ≈ 1 GB of disk.
# Idempotent: when TAG already holds the same worker, CLI, root and script, nothing is rebuilt.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$here/../target}/release/anywork-worker}"
tag="${2:-anywork-worker:latest}"
uid=10001
suite=bookworm
packages=bash,coreutils,git,ca-certificates,curl,ripgrep,procps,less
cache="${ANYWORK_CACHE:-$HOME/.cache/anywork}"

die() { echo "build-worker-image: $*" >&2; exit 1; }
say() { echo "build-worker-image: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $* (run this script as root, or install sudo)"
    fi
}

[ -f "$bin" ] && [ -x "$bin" ] || die "no worker binary at $bin: build it first (cargo build --release -p anywork-worker) or pass its path"
command -v docker >/dev/null || die "the docker CLI is missing"

claude=""
if [ "${WITH_CLAUDE:-1}" != 0 ]; then
    claude="${CLAUDE_BIN:-}"
    if [ -z "$claude" ]; then
        claude="$(python3 - 2>/dev/null <<'PY' || true
import os, claude_agent_sdk
p = os.path.join(os.path.dirname(claude_agent_sdk.__file__), "_bundled", "claude")
print(p if os.access(p, os.X_OK) else "")
PY
)"
    fi
    [ -n "$claude" ] || claude="$(command -v claude || true)"
    [ -n "$claude" ] && [ -x "$claude" ] || die "no claude CLI found: pip install claude-agent-sdk (it ships one), set CLAUDE_BIN, or WITH_CLAUDE=0 for an image without it"
fi

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
    [ -n "$mirror" ] || mirror="$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)"
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi

# The Debian root, built once per package list and cached as a tarball.
mkdir -p "$cache"
base_key="$(printf '%s %s %s' "$suite" "$packages" "$mirror" | sha256sum | cut -c1-16)"
base="$cache/rootfs-$suite-$base_key.tar"
if [ ! -s "$base" ]; then
    command -v debootstrap >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
        || die "debootstrap is missing and could not be installed (apt-get install debootstrap)"
    tmp="$(mktemp -d)"
    say "debootstrap --variant=minbase $suite from $mirror (once; cached in $base)"
    as_root debootstrap --variant=minbase --include="$packages" "$suite" "$tmp/root" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -n 30 "$tmp/debootstrap.log" >&2; as_root rm -rf "$tmp"; die "debootstrap failed (log above)"; }
    # What an agent's shell needs, not apt's caches, docs or locales.
    as_root rm -rf "$tmp/root/var/cache/apt/archives"/*.deb "$tmp/root/var/lib/apt/lists"/* \
        "$tmp/root/usr/share/doc" "$tmp/root/usr/share/man" "$tmp/root/usr/share/info" "$tmp/root/usr/share/locale"
    as_root tar -C "$tmp/root" --numeric-owner -cf "$base.part" .
    as_root chown "$(id -u):$(id -g)" "$base.part"
    mv "$base.part" "$base"
    as_root rm -rf "$tmp"
fi

# What the image is made from. Same digest → nothing to do.
digest="$( {
    sha256sum "$bin" | cut -d' ' -f1
    if [ -n "$claude" ]; then sha256sum "$claude" | cut -d' ' -f1; else echo no-claude; fi
    echo "$base_key"
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
} | sha256sum | cut -d' ' -f1)"
current="$(docker image inspect -f '{{ index .Config.Labels "anywork.image.digest" }}' "$tag" 2>/dev/null || true)"
if [ "$current" = "$digest" ]; then
    say "$tag is up to date ($bin)"
    exit 0
fi

# The layer AnyWork adds on top of the Debian root: binaries, the worker user, /workspace.
extra="$(mktemp -d)"
trap 'rm -rf "$extra" "$extra.tar"' EXIT
mkdir -p "$extra/usr/local/bin" "$extra/etc" "$extra/workspace"
install -m 0755 "$bin" "$extra/usr/local/bin/anywork-worker"
[ -z "$claude" ] || install -m 0755 "$claude" "$extra/usr/local/bin/claude"
tar -xOf "$base" ./etc/passwd >"$extra/etc/passwd"
tar -xOf "$base" ./etc/group >"$extra/etc/group"
echo "worker:x:$uid:$uid:AnyWork worker:/workspace:/bin/bash" >>"$extra/etc/passwd"
echo "worker:x:$uid:" >>"$extra/etc/group"

# One tarball: the root (minus the two files replaced), then the layer; /workspace owned by the worker.
cp "$base" "$extra.tar"
tar --delete -f "$extra.tar" ./etc/passwd ./etc/group
files=(./usr/local/bin/anywork-worker ./etc/passwd ./etc/group)
[ -z "$claude" ] || files+=(./usr/local/bin/claude)
tar -C "$extra" --numeric-owner --owner=0 --group=0 -rf "$extra.tar" "${files[@]}"
tar -C "$extra" --numeric-owner --owner="$uid" --group="$uid" --no-recursion -rf "$extra.tar" ./workspace

env_line="WORKER_HOST=0.0.0.0 WORKER_PORT=8080 WORKSPACE_DIR=/workspace HOME=/workspace"
env_line+=" PATH=/usr/local/bin:/usr/bin:/bin SHELL=/bin/bash LANG=C.UTF-8"
env_line+=" SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
[ -z "$claude" ] || env_line+=" CLAUDE_BIN=/usr/local/bin/claude DISABLE_AUTOUPDATER=1"
docker import \
    --change "USER $uid" \
    --change "WORKDIR /workspace" \
    --change "ENV $env_line" \
    --change "EXPOSE 8080" \
    --change "VOLUME /workspace" \
    --change "LABEL anywork.image.digest=$digest" \
    --change 'ENTRYPOINT ["/usr/local/bin/anywork-worker"]' \
    "$extra.tar" "$tag" >/dev/null
say "built $tag from $bin${claude:+ and $claude} ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
