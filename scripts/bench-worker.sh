#!/usr/bin/env bash
# Worker benchmarks: /chat latencies per executor, native per-turn overhead, idle RSS,
# memory per idle session (`--memory-only` for the last two).
# Figures go to docs/benchmarks.md by hand, with this command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_claude
cargo build --release -p anywork-worker -p anywork-bench
"${CARGO_TARGET_DIR:-target}/release/anywork-bench" worker "$@"
