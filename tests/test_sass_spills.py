"""scripts/sass_spills.py: spill instructions placed by loop depth in a `cuobjdump -sass` listing. The listings here
are hand-written with their loops known; the real kernels' report comes from scripts/cpp_tests.sh where a
cuobjdump is found (CI's image has none)."""

import os

import pytest
from conftest import load_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "sass_spills.py")


@pytest.fixture(scope="module")
def spills():
    return load_module(_PATH)


def _listing(arch, name, body):
    """A function as cuobjdump -sass prints it: `/*addr*/ instruction ;` lines with their encodings."""
    lines = [f"\n\tcode for {arch}\n\t.target\t{arch}\n", f"\t\tFunction : {name}"]
    for i, insn in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {insn} ;    /* 0x0000000000000000 */")
        lines.append("                                                               /* 0x0000000000000000 */")
    return "\n".join(lines) + "\n"


# A unit loop (0x10 .. 0x50) around a tile loop (0x20 .. 0x30); the unit loop's way back runs through ptxas's
# `CALL.REL.NOINC` jump, so a reader that does not follow it sees no outer loop. Spills: a store before the loops,
# a load in the unit loop, a load in the tile loop. The last line is the self-loop ptxas pads a function with.
NESTED = [
    "STL [R1], R2",  # 0x00  depth 0
    "LDL R4, [R1]",  # 0x10  depth 1
    "LDL R5, [R1+0x4]",  # 0x20  depth 2
    "@P0 BRA 0x20",  # 0x30  tile loop's back edge
    "@P1 CALL.REL.NOINC 0x60",  # 0x40  next unit
    "EXIT",  # 0x50
    "BRA 0x10",  # 0x60  unit loop's back edge
    "BRA 0x70",  # 0x70
]

# A loop with two entries (irreducible): the entry jumps into its second block or falls into its first. No block
# of it dominates the other, so a natural-loop (dominator) count would find no loop here.
TWO_ENTRIES = [
    "@P0 BRA 0x30",  # 0x00
    "LDL R2, [R1]",  # 0x10  A
    "@P1 EXIT",  # 0x20
    "STL [R1], R2",  # 0x30  B
    "BRA 0x10",  # 0x40  B -> A
]


def _one(spills, body):
    funcs = spills.parse(_listing("sm_90a", "_Z1kv", body))
    assert len(funcs) == 1 and funcs[0][0] == "sm_90a" and funcs[0][1] == "_Z1kv"
    return funcs[0][2]


def test_nested_loops_and_the_noinc_jump(spills):
    insns = _one(spills, NESTED)
    assert [a for a, _ in insns] == [16 * i for i in range(len(NESTED))]
    depth, _ = spills.loops(insns)
    assert depth == [0, 1, 2, 2, 1, 0, 1, 1]
    by_depth, deepest, worst = spills.summarise(insns)
    assert by_depth == {0: [1, 0], 1: [0, 1], 2: [0, 1]}
    assert deepest == 2
    assert worst == (2, 1, 2)  # the tile loop: its load, of its two instructions


def test_a_loop_with_two_entries_counts(spills):
    depth, _ = spills.loops(_one(spills, TWO_ENTRIES))
    assert depth == [0, 1, 1, 1, 1]
    by_depth, _, worst = spills.summarise(_one(spills, TWO_ENTRIES))
    assert by_depth == {1: [1, 1]} and worst == (1, 2, 4)


def test_uniform_predicate_branch_and_subroutine_return(spills):
    """`BRA.U !UP0, target` is a jump; a RET ends a block without a successor (a subroutine is not followed)."""
    body = ["LDL R2, [R1]", "@P0 BRA.U !UP0, 0x0", "EXIT", "STL [R1], R2", "RET.REL.NODEC R2 0x0"]
    depth, _ = spills.loops(_one(spills, body))
    assert depth == [1, 1, 0, 0, 0]


def test_report_names_kernels_by_architecture(spills, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(spills, "demangle", list)
    text = _listing("sm_80", "_Z4rowsv", NESTED) + _listing("sm_90a", "_Z4rowsv", NESTED[:1] + ["EXIT"])
    text += _listing("sm_90a", "_Z5cleanv", ["EXIT"])
    path = tmp_path / "listing.sass"
    path.write_text(text)
    assert spills.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 kernel instances, 2 with spill instructions" in out
    assert "sm_80   _Z4rowsv: d0: 1/0 d1: 0/1 d2: 0/1; depth 2 of 2: 1 of its 2 instructions" in out
    assert "sm_90a  _Z4rowsv: d0: 1/0; outside every loop (deepest 0)" in out
    assert "_Z5cleanv" not in out
    assert spills.main([str(path), "--all"]) == 0
    assert "sm_90a  _Z5cleanv: none" in capsys.readouterr().out


def test_an_object_without_cuobjdump_is_reported(spills, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(spills, "find_cuobjdump", lambda given=None: None)
    obj = tmp_path / "kernels.o"
    obj.write_bytes(b"\x7fELF\x02\x01\x01")
    assert spills.main([str(obj)]) == 2
    assert "no cuobjdump" in capsys.readouterr().out


def test_empty_listing_and_usage(spills, tmp_path, capsys):
    path = tmp_path / "empty.sass"
    path.write_text("nothing here\n")
    assert spills.main([str(path)]) == 2
    assert spills.main(["--help"]) == 0
    assert spills.main([]) == 64
    assert "python scripts/sass_spills.py" in capsys.readouterr().out
