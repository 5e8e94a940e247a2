#!/usr/bin/env python3
# Shared by cats.py: reads DIR/maps and DIR/perf.data (perf script), labels each fault by its call chain.
"""analyze.py DIR BINARY: perf script of DIR/perf.data (page faults with call chains) →
faults and resident KiB of the binary's mappings, by what caused them."""
import sys, re, subprocess, collections, struct
bname = binary.split('/')[-1]
maps = []
for line in open(f"{d}/maps"):
    f = line.split()
    if len(f) >= 6:
        lo, hi = (int(x, 16) for x in f[0].split('-'))
        maps.append((lo, hi, f[1], f[5]))
    else:
        lo, hi = (int(x, 16) for x in f[0].split('-')); maps.append((lo, hi, f[1], 'anon'))
def region(a):
    for lo, hi, p, n in maps:
        if lo <= a < hi:
            if n.endswith(bname): return 'bin ' + {'r-xp': 'text', 'r--p': 'rodata', 'rw-p': 'data'}.get(p, p)
            return n.split('/')[-1]
    return 'gone'
txt = subprocess.run(["perf", "script", "-i", f"{d}/perf.data", "-F", "tid,addr,ip,sym,dso"], capture_output=True, text=True).stdout
samples = []
for block in txt.split("\n\n"):
    lines = [l for l in block.split("\n") if l.strip()]
    if not lines: continue
    h = lines[0].split()
    try: addr = int(h[1], 16)
    except: continue
    frames = []
    for l in lines[1:]:
        m = re.match(r"\s*[0-9a-f]+ (.*) \((.*)\)$", l)
        if m: frames.append(m.group(1))
    samples.append((addr, region(addr), frames))
SKIP = ('std', 'core', 'alloc', 'tokio', 'futures_util', 'futures_core', '__rust', 'hashbrown', 'F', 'T', 'S', '[unknown]', 'start_thread', 'clone3', 'anywork_server', 'main', '__libc_start', '_start', 'mut', 'tracing', 'async_trait', 'pin_project_lite', 'tower', 'I', 'Fut', 'B', 'R')
def crate(fr):
    n = re.sub(r"^(<|&|\*const |\*mut |dyn |mut )+", "", fr)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)", n)
    return m.group(1) if m else fr[:15]
def label(frames):
    # innermost anywork frame, trimmed, and the first library crate below it
    inner = None; lib = None
    for i, fr in enumerate(frames):
        c = crate(fr)
        if c.startswith('anywork') and inner is None:
            inner = re.sub(r"\{\{closure\}\}|::\{\{closure\}\}", "", fr)[:90]
            for fr2 in reversed(frames[:i]):
                c2 = crate(fr2)
                if c2 not in SKIP: lib = c2; break
            break
    if inner is None:
        for fr in reversed(frames):
            c = crate(fr)
            if c not in SKIP: inner = '(no anywork frame) ' + c; break
    return f"{inner or '?'} > {lib or '-'}"
