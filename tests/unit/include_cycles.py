#!/usr/bin/python3
"""Fail on any cycle in the #include graph of ktrelay's own sources.

Nodes are modules: src/<dir>/name.c and src/<dir>/name.h are one node
"<dir>/name". An edge A -> B exists when a file of A includes "B.h" with
quotes (system headers and the generated kt_build.h are not nodes). Any cycle
(a strongly connected component of more than one node, or a node including
itself through another name) fails the test and is printed, so the layering
in ARCHITECTURE.md stays true.

  include_cycles.py SRC_DIR      check a tree (exit 1 on a cycle)
  include_cycles.py --self-test  check the checker on planted trees
"""
import os
import re
import sys
import tempfile

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def module_of(path):
    base, ext = os.path.splitext(path)
    return base if ext in ('.c', '.h') else None


def graph(src):
    nodes, edges = set(), {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            node = module_of(rel)
            if node is None:
                continue
            nodes.add(node)
            with open(os.path.join(src, rel), encoding='utf-8', errors='replace') as fh:
                text = fh.read()
            for inc in INCLUDE.findall(text):
                target = module_of(inc)
                if target and target != node and os.path.exists(os.path.join(src, inc)):
                    edges.setdefault(node, set()).add(target)
    return nodes, edges


def cycles(nodes, edges):
    """Tarjan's strongly connected components; returns those with a cycle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        # iterative DFS to stay clear of the recursion limit
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def path_in(comp, edges):
    """One concrete cycle inside a component, for the message."""
    members = set(comp)
    start = comp[0]
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def check(src, quiet=False):
    nodes, edges = graph(src)
    found = cycles(nodes, edges)
    if not quiet:
        for comp in found:
            print('include cycle: ' + ' -> '.join(path_in(comp, edges))
                  + (f' (strongly connected: {", ".join(comp)})' if len(comp) > 2 else ''))
        if not found:
            print(f'no include cycles among {len(nodes)} modules, '
                  f'{sum(len(e) for e in edges.values())} edges')
    return found


def plant(root, files):
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, 'w') as fh:
            fh.write(text)


def self_test():
    layered = {
        'core/buf.h': '#include <stddef.h>\n',
        'core/buf.c': '#include "core/buf.h"\n',
        'tls/conn.h': '#include "core/buf.h"\n',
        'tls/conn.c': '#include "tls/conn.h"\n#include "core/buf.h"\n',
        'smtpd/session.h': '#include "tls/conn.h"\n',
        'smtpd/session.c': '#include "smtpd/session.h"\n#include "kt_build.h"\n',
    }
    # the shape issue 10 describes: server.c -> session.c -> transport.c -> server.c,
    # where only the .c files close the loop (a .c and its .h are one node)
    knot = dict(layered)
    knot.update({
        'smtpd/server.h': '#include "core/buf.h"\n',
        'smtpd/server.c': '#include "smtpd/server.h"\n#include "smtpd/session.h"\n',
        'tls/transport.c': '#include "smtpd/server.h"\n',
        'smtpd/session.c': '#include "smtpd/session.h"\n#include "tls/transport.h"\n',
        'tls/transport.h': '\n',
    })
    two = dict(layered)
    two['core/buf.c'] = '#include "core/buf.h"\n#include "tls/conn.h"\n'
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        plant(os.path.join(d, 'ok'), layered)
        plant(os.path.join(d, 'knot'), knot)
        plant(os.path.join(d, 'two'), two)
        if check(os.path.join(d, 'ok'), quiet=True):
            print('self-test: a layered tree was reported as cyclic')
            failures += 1
        got = check(os.path.join(d, 'knot'), quiet=True)
        if got != [['smtpd/server', 'smtpd/session', 'tls/transport']]:
            print(f'self-test: the planted three-module cycle was not found exactly: {got}')
            failures += 1
        got = check(os.path.join(d, 'two'), quiet=True)
        if got != [['core/buf', 'tls/conn']]:
            print(f'self-test: the planted buf <-> conn cycle was not found: {got}')
            failures += 1
    print('self-test: ' + ('FAILED' if failures else 'the checker finds planted cycles and passes a layered tree'))
    return failures == 0


if __name__ == '__main__':
    if len(sys.argv) == 2 and sys.argv[1] == '--self-test':
        sys.exit(0 if self_test() else 1)
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(1 if check(sys.argv[1]) else 0)
