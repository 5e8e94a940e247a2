#!/usr/bin/env python3
"""lockdeps.py Cargo.lock ROOT: every package ROOT depends on in the lock file, directly or
not (dev-dependencies included: the lock does not tell them apart), itself included, one a
line: `name version: its dependencies' names, sorted`, sorted. A crate's symbol hashes change
when its version or its dependencies do; tests/symbol_order.rs computes the same list."""
import sys


def packages(text):
    out, cur, in_deps = [], None, False
    for line in text.splitlines():
        line = line.strip()
        if line == "[[package]]":
            cur = {"deps": []}
            out.append(cur)
            in_deps = False
        elif cur is None:
            continue
        elif in_deps:
            if line == "]":
                in_deps = False
            else:
                cur["deps"].append(line.strip('",').split(" ")[:2])
        elif line.startswith("name = "):
            cur["name"] = line[7:].strip('"')
        elif line.startswith("version = "):
            cur["version"] = line[10:].strip('"')
        elif line == "dependencies = [":
            in_deps = True
    return out


def closure(pkgs, root):
    def find(dep):
        hits = [p for p in pkgs if p["name"] == dep[0] and (len(dep) == 1 or p["version"] == dep[1])]
        if len(hits) != 1:
            raise SystemExit(f"lock: {dep} matches {len(hits)} packages")
        return hits[0]

    seen, todo = {}, [find([root])]
    while todo:
        p = todo.pop()
        key = (p["name"], p["version"])
        if key in seen:
            continue
        seen[key] = p
        todo.extend(find(d) for d in p["deps"])
    return sorted(
        f'{p["name"]} {p["version"]}: {" ".join(sorted(d[0] for d in p["deps"]))}'.rstrip()
        for p in seen.values()
    )


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("\n".join(closure(packages(f.read()), sys.argv[2])))
