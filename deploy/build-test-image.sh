#!/usr/bin/env bash
# Builds a minimal worker image from an already compiled `anywork-worker` binary, without a
# registry: no base image is pulled. The root filesystem holds the binary, the shared
# libraries `ldd` lists (and the dynamic loader), /bin/sh (dash) with its libraries, /tmp,
# /workspace owned by uid 10001 (a named volume mounted there inherits that ownership),
# /etc/passwd + /etc/group entries for that user, and the CA certificates when the host has
# them. It is loaded with `docker import`.
#
#   deploy/build-test-image.sh [WORKER_BINARY] [TAG]
#
# WORKER_BINARY defaults to $CARGO_TARGET_DIR/release/anywork-worker (or target/release/…),
# TAG to anywork-worker:test. Idempotent: when TAG already holds this binary (same sha256 and
# same script), nothing is rebuilt. For an image with the usual tools (bash, git, ripgrep), or
# the Claude Code CLI, build deploy/Dockerfile.worker where a registry is reachable.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$here/../target}/release/anywork-worker}"
tag="${2:-anywork-worker:test}"
uid=10001

die() { echo "build-test-image: $*" >&2; exit 1; }

[ -f "$bin" ] && [ -x "$bin" ] || die "no worker binary at $bin: build it first (cargo build --release -p anywork-worker) or pass its path"
command -v docker >/dev/null || die "the docker CLI is missing"
command -v ldd >/dev/null || die "ldd is missing (libc-bin)"

# What the image is made from: the binary and this script. Same digest → nothing to do.
digest="$( { sha256sum "$bin" | cut -d' ' -f1; sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)"
current="$(docker image inspect -f '{{ index .Config.Labels "anywork.image.digest" }}' "$tag" 2>/dev/null || true)"
if [ "$current" = "$digest" ]; then
    echo "build-test-image: $tag is up to date ($bin)"
    exit 0
fi

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

# Copies a file into the root at the same path, following symlinks, plus the symlink itself.
put() {
    local src="$1"
    local dest="$root$src"
    mkdir -p "$(dirname "$dest")"
    cp -L "$src" "$dest"
}

# The libraries (and loader) an ELF file needs, as absolute paths.
libs_of() {
    ldd "$1" 2>/dev/null | awk '
        $2 == "=>" && $3 ~ /^\// { print $3 }
        $1 ~ /^\// { print $1 }'
}

mkdir -p "$root/usr/local/bin" "$root/bin" "$root/etc" "$root/tmp" "$root/workspace" "$root/proc" "$root/dev" "$root/sys"
chmod 1777 "$root/tmp"
cp "$bin" "$root/usr/local/bin/anywork-worker"
chmod 0755 "$root/usr/local/bin/anywork-worker"

sh_path="$(readlink -f /bin/sh)"
cp "$sh_path" "$root/bin/sh"
chmod 0755 "$root/bin/sh"

for lib in $( { libs_of "$bin"; libs_of "$sh_path"; } | sort -u); do
    put "$lib"
done
# The loader is looked up by its ABI path (/lib64/ld-linux-x86-64.so.2 on x86-64).
interp="$(ldd "$bin" | awk '$1 ~ /^\// { print $1 }' | head -n1)"
[ -n "$interp" ] || die "ldd found no dynamic loader for $bin (a static binary needs none: then drop this check)"
[ -f "$root$interp" ] || put "$interp"

if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    put /etc/ssl/certs/ca-certificates.crt
fi

cat >"$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
worker:x:$uid:$uid:AnyWork worker:/workspace:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
cat >"$root/etc/group" <<EOF
root:x:0:
worker:x:$uid:
nogroup:x:65534:
EOF

# The worker owns its workspace; root owns everything else.
tar -C "$root" --numeric-owner --owner=0 --group=0 --exclude=./workspace -cf "$root.tar" .
tar -C "$root" --numeric-owner --owner="$uid" --group="$uid" --no-recursion -rf "$root.tar" ./workspace
trap 'rm -rf "$root" "$root.tar"' EXIT

docker import \
    --change "USER $uid" \
    --change "WORKDIR /workspace" \
    --change "ENV WORKER_HOST=0.0.0.0 WORKER_PORT=8080 WORKSPACE_DIR=/workspace HOME=/workspace PATH=/usr/local/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "EXPOSE 8080" \
    --change "VOLUME /workspace" \
    --change "LABEL anywork.image.digest=$digest" \
    --change 'ENTRYPOINT ["/usr/local/bin/anywork-worker"]' \
    "$root.tar" "$tag" >/dev/null
echo "build-test-image: built $tag from $bin"
