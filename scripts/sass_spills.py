"""Where the CUDA kernels' register spills sit: in which loop, and how many of its instructions they are.

    python scripts/sass_spills.py FILE... [--cuobjdump PATH] [--all]

FILE: an object, cubin or library built by nvcc (disassembled with `cuobjdump -sass`), or a text file holding
such a disassembly. `ptxas -v` (scripts/ptxas_report.py) gives a kernel's spill bytes, not whether the spill
instructions (STL / LDL: local memory, cached in L1) run once per block or once per tile: this reads the machine
code, builds each kernel's control-flow graph and its loop nesting (strongly connected components, entered at
their headers), and prints for each kernel that spills, per architecture, its stores / loads by loop depth and,
for the deepest loop that holds any, their share of that loop's instructions. Depth 0 runs once per thread; in
the tensor-core kernels depth 1 is the loop over work units (an X block), depth 2 the loop over bank tiles.
With --all, kernels without spills are listed too. Exit 0 with a report, 2 where nothing could be read.

cuobjdump: --cuobjdump, else $CUOBJDUMP, else the one on PATH, else the CUDA toolkit's. CUDA's toolkit has it;
this project's CI image has nvcc without it (the `nvidia-cuda-cuobjdump` wheel carries one).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys


def _load_ptxas_report():
    """scripts/ptxas_report.py (its demangling and short names), loaded by path: scripts/ is not a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ptxas_report.py")
    spec = importlib.util.spec_from_file_location("contrastbound_ptxas_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_report = _load_ptxas_report()
demangle, short = _report.demangle, _report.short

_ARCH = re.compile(r"^\s*code for (sm_\w+)")
_FUNC = re.compile(r"^\s*Function : (\S+)")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# A jump: BRA (also BRA.U / BRA.DIV, with a uniform predicate operand), and CALL.REL.NOINC, ptxas's loop exit
# (`@P CALL.REL.NOINC next; BRA top`), which returns nowhere. A subroutine call (CALL.REL with a RET) is not followed.
_BRANCH = re.compile(r"\b(?:BRA|CALL\.REL\.NOINC)(?:\.\w+)*\s+(?:!?U?P\w+\s*,\s*)?(0x[0-9a-f]+)")
_END = re.compile(r"\b(EXIT|RET)(?:\.\w+)*\b")
_SPILL = re.compile(r"\b(STL|LDL)(?:\.[\w.]+)?\s")


def parse(text: str):
    """[(arch, mangled name, [(address, instruction), ...])] for each function of a `cuobjdump -sass` listing."""
    out, arch, cur = [], "", None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC.match(line)
        if m:
            cur = (arch, m.group(1), [])
            out.append(cur)
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            cur[2].append((int(m.group(1), 16), m.group(2)))
    return out


def _blocks(insns):
    """Basic blocks (index of each instruction's block) and the successors of each block."""
    addrs = [a for a, _ in insns]
    at = {a: i for i, a in enumerate(addrs)}
    leaders = {0}
    for i, (_, t) in enumerate(insns):
        m = _BRANCH.search(t)
        if m and int(m.group(1), 16) in at:
            leaders.add(at[int(m.group(1), 16)])
        if (m or _END.search(t)) and i + 1 < len(insns):
            leaders.add(i + 1)
    starts = sorted(leaders)
    block_of, b = [], -1
    for i in range(len(insns)):
        if b + 1 < len(starts) and starts[b + 1] == i:
            b += 1
        block_of.append(b)
    succ = [set() for _ in starts]
    for b, s in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(insns)) - 1
        t = insns[last][1]
        m = _BRANCH.search(t)
        if m and int(m.group(1), 16) in at:
            succ[b].add(block_of[at[int(m.group(1), 16)]])
        unconditional = (m or _END.search(t)) and not t.startswith("@")
        if not unconditional and b + 1 < len(starts):
            succ[b].add(b + 1)
    return block_of, succ


def _sccs(nodes, succ):
    """Strongly connected components of the subgraph on `nodes` (Tarjan's algorithm, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root] & nodes)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(succ[w] & nodes))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def loops(insns):
    """(depth of each instruction, [(loop's block set, depth)]): the loop nesting forest of the control-flow graph.
    A loop is a strongly connected component; its headers are the blocks entered from outside it (the lowest
    address where none is); the loops inside it are the components left once the edges back to its headers go.
    This counts irreducible loops too, which a dominator-based (natural loop) count misses."""
    if not insns:
        return [], []
    block_of, succ = _blocks(insns)
    n = len(succ)
    depth, found = [0] * n, []
    pending = [(set(range(n)), [set(s) for s in succ], 0)]
    while pending:
        nodes, edges, level = pending.pop()
        for comp in _sccs(nodes, edges):
            v = next(iter(comp))
            if len(comp) == 1 and v not in edges[v]:
                continue  # not a loop
            for b in comp:
                depth[b] += 1
            found.append((comp, level + 1))
            heads = {b for b in comp if any(b in succ[p] for p in range(n) if p not in comp)} or {min(comp)}
            inner = [(s - heads) & comp if b in comp else set() for b, s in enumerate(edges)]
            pending.append((comp, inner, level + 1))
    return [depth[b] for b in block_of], [({i for i, b in enumerate(block_of) if b in comp}, d) for comp, d in found]


def summarise(insns):
    """Per depth {depth: [stores, loads]}, the function's deepest loop level, and for the deepest loop holding a spill
    (depth, its spill instructions, its instructions), or None where nothing spills."""
    depth, found = loops(insns)
    by_depth = {}
    spill_at = [i for i, (_, t) in enumerate(insns) if _SPILL.search(t)]
    for i in spill_at:
        kind = 0 if _SPILL.search(insns[i][1]).group(1) == "STL" else 1
        by_depth.setdefault(depth[i], [0, 0])[kind] += 1
    worst = None
    for members, d in found:
        here = [i for i in spill_at if i in members]
        if here and (worst is None or d > worst[0] or (d == worst[0] and len(here) > worst[1])):
            worst = (d, len(here), len(members))
    return by_depth, max(depth, default=0), worst


def disassemble(path: str, cuobjdump: str | None) -> str:
    if not path.endswith((".o", ".cubin", ".so", ".fatbin", ".a")) and not _is_elf(path):
        with open(path, errors="replace") as f:
            return f.read()
    if cuobjdump is None:
        raise FileNotFoundError("no cuobjdump (give --cuobjdump PATH or set CUOBJDUMP)")
    res = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed: {res.stderr.strip()[:300]}")
    return res.stdout


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_cuobjdump(given: str | None = None) -> str | None:
    for cand in (given, os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "cuobjdump")
    return cand if os.access(cand, os.X_OK) else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv) or not argv:
        print(__doc__)
        return 0 if argv else 64
    show_all = "--all" in argv
    argv = [a for a in argv if a != "--all"]
    given = None
    if "--cuobjdump" in argv:
        i = argv.index("--cuobjdump")
        if i + 1 >= len(argv):
            print("--cuobjdump needs a path")
            return 64
        given = argv[i + 1]
        del argv[i:i + 2]
    tool = find_cuobjdump(given)
    funcs = []
    for path in argv:
        try:
            funcs += parse(disassemble(path, tool))
        except (OSError, RuntimeError) as e:
            print(f"sass spills: {path}: {e}")
            return 2
    if not funcs:
        print("sass spills: no functions in the disassembly")
        return 2
    names = demangle([f[1] for f in funcs])
    rows = {}
    for (arch, _, insns), name in zip(funcs, names):
        rows[(short(name), arch)] = summarise(insns)
    spilling = [k for k, v in rows.items() if v[0]]
    print(f"sass spills: {len(rows)} kernel instances, {len(spilling)} with spill instructions (STL / LDL); "
          f"stores / loads by loop depth (0: once per thread), and the deepest loop holding any:")
    for (kernel, arch), (by_depth, deepest, worst) in sorted(rows.items()):
        if not by_depth and not show_all:
            continue
        parts = " ".join(f"d{d}: {st}/{ld}" for d, (st, ld) in sorted(by_depth.items())) or "none"
        tail = ""
        if worst is not None:
            tail = f"; depth {worst[0]} of {deepest}: {worst[1]} of its {worst[2]} instructions"
        elif by_depth:
            tail = f"; outside every loop (deepest {deepest})"
        print(f"  {arch:<7} {kernel}: {parts}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
