# Shared by scripts/*.sh: installing packages and a throw-away PostgreSQL on loopback.
# Source it; it defines functions only.

log() { printf '\n==> %s\n' "$*" >&2; }

# Free disk where the build goes, and the build's size so far: a run that fails with "No space
# left on device" then shows how much there was.
report_disk() {
    local target="${CARGO_TARGET_DIR:-target}"
    mkdir -p "$target"
    log "disk: $(df -h --output=avail "$target" | tail -1 | tr -d ' ') free; target $(du -sh "$target" 2>/dev/null | cut -f1)"
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2
        return 1
    fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# --- PostgreSQL -------------------------------------------------------------------------
start_postgres() {
    local bin dir port owner run
    bin=$(pg_bindir)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        log "installing PostgreSQL"
        apt_install postgresql
        bin=$(pg_bindir)
    fi
    dir=$(mktemp -d "${TMPDIR:-/tmp}/anywork-pg.XXXXXX")
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    run=()
    if [ "$(id -u)" = 0 ]; then
        # initdb refuses to run as root: use the postgres user the package made (or our own).
        owner=postgres
        id "$owner" >/dev/null 2>&1 || { owner=anywork-pg; id "$owner" >/dev/null 2>&1 || useradd --system --no-create-home "$owner"; }
        chown "$owner" "$dir"
        run=(runuser -u "$owner" --)
    fi
    log "starting PostgreSQL ($bin) on 127.0.0.1:$port in $dir"
    "${run[@]}" "$bin/initdb" -A trust -U postgres -E UTF8 --locale=C -D "$dir/data" >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null \
        || { cat "$dir/server.log" >&2; return 1; }
    PG_STOP=("${run[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
    PG_DIR=$dir
    export ANYWORK_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

stop_postgres() {
    if [ -n "${PG_DIR:-}" ]; then
        "${PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}

# --- The Claude Code CLI ------------------------------------------------------------------
# PyPI's claude-agent-sdk wheel ships the native `claude` binary; no npm needed.
claude_from_wheel() {
    python3 - <<'PY' 2>/dev/null
import os, claude_agent_sdk
p = os.path.join(os.path.dirname(claude_agent_sdk.__file__), "_bundled", "claude")
print(p if os.access(p, os.X_OK) else "")
PY
}

ensure_claude() {
    if [ -n "${CLAUDE_BIN:-}" ] && [ -x "$CLAUDE_BIN" ]; then return 0; fi
    command -v python3 >/dev/null || apt_install python3 python3-pip
    local bin
    bin=$(claude_from_wheel || true)
    if [ -z "$bin" ]; then
        log "installing the claude CLI (pip install claude-agent-sdk)"
        python3 -m pip install --quiet claude-agent-sdk \
            || python3 -m pip install --quiet --break-system-packages claude-agent-sdk
        bin=$(claude_from_wheel || true)
    fi
    [ -n "$bin" ] || { echo "could not install the claude CLI" >&2; return 1; }
    export CLAUDE_BIN=$bin
    log "claude CLI: $CLAUDE_BIN ($("$CLAUDE_BIN" --version 2>/dev/null || echo '?'))"
}

# --- Chromium for the web UI's browser test --------------------------------------------------
ensure_chromium() {
    if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
        log "installing chromium and chromium-driver"
        apt_install chromium chromium-driver
    fi
    CHROMEDRIVER=$(command -v chromedriver)
    export CHROMEDRIVER
}

# --- crate checks -------------------------------------------------------------------------
# `cargo check -p X` alone resolves X's features without the rest of the workspace, so code
# that compiles only thanks to a feature another crate turns on fails here. Warnings fail too
# (an unused import behind a missing `cfg` is a feature leak as well).
check_crates_alone() {
    local dir name flags out
    for dir in crates/*/; do
        [ -f "$dir/src/lib.rs" ] || continue
        name=$(basename "$dir")
        for flags in "" "--no-default-features"; do
            echo "cargo check -p $name $flags" >&2
            if ! out=$(cargo check -p "$name" $flags --locked --message-format short 2>&1); then
                echo "$out" >&2
                echo "$name does not build alone with ${flags:-its default features}" >&2
                return 1
            fi
            if echo "$out" | grep -qE '(^|: )warning'; then
                echo "$out" >&2
                echo "$name warns when built alone with ${flags:-its default features}" >&2
                return 1
            fi
        done
    done
}

# Unique crates (name + version) in the normal dependency tree of a package, itself included.
dependency_count() {
    cargo tree --locked -e normal --prefix none "$@" | sed 's/ (\*)//' | grep -v '^$' | sort -u | wc -l
}

# The budget written in ARCHITECTURE.md ("Dependency budget").
check_dependency_budget() {
    local core runtime banned
    core=$(dependency_count -p anywork-core)
    runtime=$(dependency_count -p anywork-runtime)
    echo "anywork-core: $core crates (budget 25); anywork-runtime: $runtime crates (budget 110)" >&2
    if [ "$core" -gt 25 ] || [ "$runtime" -gt 110 ]; then
        echo "over the dependency budget: see ARCHITECTURE.md" >&2
        return 1
    fi
    banned=$(cargo tree --locked -e normal --prefix none -p example-static |
        grep -E '^(axum|clap|anywork-worker|anywork-server) ' | sort -u || true)
    if [ -n "$banned" ]; then
        echo "examples/static (no HTTP server) depends on: $banned" >&2
        return 1
    fi
}
