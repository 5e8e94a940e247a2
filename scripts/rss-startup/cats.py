import sys, collections
# cats.py DIR BINARY: the page faults faults.sh recorded, by subsystem (the call chain's first match):
# distinct 128 KiB windows of text and of read-only data first touched, and anonymous page faults.
d, binary = sys.argv[1], sys.argv[2]
exec(open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'analyze_common.py')).read())
def cat(fr):
    s = ' '.join(fr)
    for key, name in [('_dl_start', 'dynamic loader: relocations'), ('sqlite3', 'SQLite (C) + sqlx'), ('sqlx', 'SQLite (C) + sqlx'), ('anywork_store', 'SQLite (C) + sqlx'),
                      ('rustls', 'reqwest/rustls/hyper client'), ('reqwest', 'reqwest/rustls/hyper client'), ('hyper_util::client', 'reqwest/rustls/hyper client'),
                      ('clap', 'clap (flags, env)'), ('init_tracing', 'tracing subscriber'), ('tracing_subscriber', 'tracing subscriber'),
                      ('prometheus', 'metrics registry'), ('api_router', 'axum routers, listener, serve'), ('axum', 'axum routers, listener, serve'), ('hyper', 'axum routers, listener, serve'),
                      ('anywork_worker', 'local worker'), ('jemalloc', 'jemalloc'), ('_rjem', 'jemalloc'), ('background_thread', 'jemalloc'),
                      ('anywork_runtime', 'dispatcher/runtime'), ('anywork_channels', 'channels'), ('anywork_drivers', 'driver'), ('anywork_core', 'core types'),
                      ('tokio', 'tokio runtime, threads'), ('__libc_start_main', 'process start (std, libc)'), ('anywork_server', 'server wiring')]:
        if key in s: return name
    return 'other'
t = collections.Counter(); a = collections.Counter(); r = collections.Counter(); seen = set()
for addr, reg, fr in samples:
    if reg == 'bin text':
        w = addr >> 17
        if w not in seen: seen.add(w); t[cat(fr)] += 1
    elif reg == 'bin rodata' and addr >> 17 not in seen:
        seen.add(addr >> 17); r[cat(fr)] += 1
    elif reg in ('anon', '[heap]', '[stack]'):
        a[cat(fr)] += 1
print("category | text windows (128 KiB) | rodata/relro windows | anon page faults")
for k in sorted(set(t) | set(a) | set(r), key=lambda k: -t[k]-r[k]):
    print(f"{k} | {t[k]} | {r[k]} | {a[k]}")
print("total |", sum(t.values()), "|", sum(r.values()), "|", sum(a.values()))
