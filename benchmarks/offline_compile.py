"""Compile a decode kernel for sm_90a on a machine without a GPU: registers, spills, shared memory.

Triton's wheel ships ``cuobjdump``; ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
builds the cubin without a device. Pointer and integer arguments get the runtime's 16-byte
divisibility hints (without them loads come out scalar and unpipelined). A lead, not a
measurement: the lent H100 runs another Triton version (benchmarks/NOTES.md).

    python -m benchmarks.offline_compile tied '{"H_Q":128,"S":1,"G":128,"Q_LEN":1,"STATE_DIM":512,
        "NOPE":512,"ROPE":64,"DV":512,"BLOCK_DS":512,"BLOCK_R":64,"PAGE":64,"ROW":576,"BLOCK_H":64,
        "BLOCK_M":64,"BLOCK_N":64,"HB_PER_S":2,"SPG":1,"NUM_SPLITS":1,"STAGES":3,"DOT_PREC":"tf32",
        "UPCAST":false,"num_warps":8,"num_stages":3}'

prints registers/thread, stack (spill) bytes, LDL/STL counts in the SASS, shared memory, and
the TTGIR lines that place dot operands (``local_alloc`` = shared memory, ``warp_group_dot``).

``hopper`` compiles the Gluon kernel (kvslim/kernels/hopper_gluon.py) with Triton 3.6, the
device's version (Gluon's API differs in 3.9): make a venv with ``pip install triton==3.6.0``
(no torch needed: the module is loaded from its file) and run, e.g. MLA h_q=128 q_len=1,

    /work/venv36/bin/python benchmarks/offline_compile.py hopper '{"H_Q":128,"S":1,"G":128,"Q_LEN":1,
        "D":512,"R":64,"PAGE":64,"ROW":576,"BLOCK_H":64,"BLOCK_N":64,"HB_PER_S":2,"NUM_SPLITS":1,"STAGES":2}'

(num_warps defaults to 8 there); it also counts HGMMA and LDGSTS (cp.async) instructions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# Under the CPU interpreter @triton.jit yields interpreted functions, which cannot be compiled:
# the variable goes before anything imports triton (hence its imports inside the functions).
os.environ.pop("TRITON_INTERPRET", None)

POINTERS = dict(Q="*bf16", Cache="*bf16", BlockTable="*i32", SeqLens="*i32", O="*bf16", Lse="*fp32",
                OPart="*fp32", LsePart="*fp32")


def compile_kernel(kernel, constexprs: dict, gluon: bool = False):
    """Compile ``kernel`` (a ``@triton.jit`` decode kernel, or a ``@gluon.jit`` one) with ``constexprs``
    (+ num_warps/num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: N814
    cx = dict(constexprs)
    opts = dict(num_warps=cx.pop("num_warps", 8 if gluon else 4), num_stages=cx.pop("num_stages", 3))
    names = kernel.arg_names
    missing = [n for n in names if n[:1].isupper() and n not in cx and n not in POINTERS]
    if missing:
        raise ValueError(f"constexprs missing: {missing}")
    pointers = dict(POINTERS, Cache="*u8") if cx.get("FP8") else POINTERS  # packed fp8 rows are bytes
    sig = {n: "constexpr" if n in cx else pointers.get(n, "fp32" if n == "sm_scale_log2" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in cx and n != "sm_scale_log2"}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in cx.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resource_usage(compiled) -> str:
    """``cuobjdump -res-usage`` of the cubin, plus LDL/STL (local-memory spill) counts in its SASS."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    usage = next((line.strip() for line in res.splitlines() if "REG" in line), res.strip()[-300:])
    return (f"{usage} LDL={sass.count('LDL')} STL={sass.count('STL')} HGMMA={sass.count('HGMMA')} "
            f"LDGSTS={sass.count('LDGSTS')}")


def ptxas_advisories(compiled) -> list[str]:
    """ptxas's wgmma performance notes on the kernel's PTX (serialized wgmma, injected waits)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    return [line.strip() for line in (r.stdout + r.stderr).splitlines() if "(C75" in line]


def _load_hopper_kernel():
    """The Gluon kernel, loaded from its file (no kvslim/torch import: the Triton 3.6 venv has no torch)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kvslim", "kernels",
                        "hopper_gluon.py")
    spec = importlib.util.spec_from_file_location("kvslim_hopper_gluon", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.hopper_tied_kernel


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("tied", "separate", "hopper"):
        raise SystemExit(__doc__)
    gluon = sys.argv[1] == "hopper"
    if gluon:
        kernel = _load_hopper_kernel()
    elif sys.argv[1] == "tied":
        from kvslim.kernels.tied import _tied_kernel as kernel
    else:
        from kvslim.kernels.separate import _separate_kernel as kernel
    c = compile_kernel(kernel, json.loads(sys.argv[2]), gluon)
    print(f"shared {c.metadata.shared} B | {resource_usage(c)}")
    for note in ptxas_advisories(c) if gluon else ():
        print("  ptxas: " + note)
    for line in c.asm["ttgir"].splitlines():
        if "warp_group_dot " in line or "local_alloc" in line:
            print("  " + line.strip()[:200])


if __name__ == "__main__":
    main()
