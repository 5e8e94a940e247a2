#!/usr/bin/env bash
# Runs AnyWork's whole test suite on a fresh machine: installs what is missing (PostgreSQL,
# the claude CLI, chromium + chromedriver), starts a throw-away PostgreSQL on loopback, then
# runs rustfmt, clippy and every test.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -p anywork-store   # extra args go to `cargo test`
#
# Environment: CARGO_TARGET_DIR (reused if set), ANYWORK_TEST_DATABASE_URL (if set, that
# database is used and no PostgreSQL is started), CLAUDE_BIN (the claude CLI to test with),
# CI (set by CI: nothing may be skipped).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_postgres EXIT

if [ -z "${ANYWORK_TEST_DATABASE_URL:-}" ]; then
    start_postgres
fi
ensure_claude
ensure_chromium

# --- Rust checks and tests ----------------------------------------------------------------
command -v cargo >/dev/null || { echo "cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }

report_disk

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

log "every library crate alone: default features and --no-default-features (a feature leak fails)"
check_crates_alone

log "dependency budget (cargo tree, unique crates)"
check_dependency_budget

log "cargo test (all features)"
report_disk
cargo test --workspace --all-features --locked "$@"

# --- deploy files ---------------------------------------------------------------------------
if command -v docker-compose >/dev/null; then
    log "docker-compose config (deploy/*.yml)"
    for f in deploy/docker-compose*.yml; do
        DOCKER_GID=0 docker-compose -f "$f" config -q
    done
elif [ -n "${CI:-}" ]; then
    echo "docker-compose is missing: cannot check deploy/docker-compose*.yml" >&2
    exit 1
fi
