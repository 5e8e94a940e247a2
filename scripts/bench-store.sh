#!/usr/bin/env bash
# Store benchmarks (criterion) on memory, SQLite and a throw-away PostgreSQL.
# Figures go to docs/benchmarks.md by hand, with this command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
trap stop_postgres EXIT
[ -n "${ANYWORK_TEST_DATABASE_URL:-}" ] || start_postgres
cargo bench -p anywork-store --all-features --bench store -- "$@"
