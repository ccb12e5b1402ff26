"""Instructions in the hot loop of Keyformer's prefill scoring kernels, compiled for sm_90 (H100) on any machine:
Triton compiles them (no GPU needed), `nvdisasm` (shipped with Triton) lists the SASS, and this counts the
instructions one thread issues for one unmasked tile (the loop body without its masking branch; 64 x 32 tiles, 4
warps: 16 elements a thread), with the quarter-rate ones (MUFU, integer-to-float conversions) apart.
Usage: python bench/engine_h100/sass_count_s14.py [OLD_DIR]   (OLD_DIR: as for prefill_scoring_s14.py)"""
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

INS = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
BRA = re.compile(r"BRA\s+(?:!?U?P\d,\s*)?`\((\.L_x_\d+)\)")
QUARTER = ("MUFU", "I2F", "I2FP")


def sass(kern, **flags) -> list[str]:
    names = kern.arg_names
    sig = {}
    for n in names:
        if n.endswith("_ptr"):
            sig[n] = {"stats_ptr": "*fp32", "out_ptr": "*fp32", "q_ptr": "*bf16", "k_ptr": "*bf16",
                      "valid_ptr": "*i8", "seed_ptr": "*i64"}.get(n, "*i32")
        else:
            sig[n] = "fp32" if n in ("sm_scale", "inv_tau") else "i32"
    const = dict(GRP=1, D=128, BLOCK_M=64, BLOCK_N=32, NOISE=True, DOT_PREC="tf32", UPCAST=False)
    const.update({k: v for k, v in flags.items() if k in names})
    sig.update(dict.fromkeys(const, "constexpr"))
    # the launcher's strides, pointers and sizes are multiples of 16 at 4096 tokens: Triton specializes on that
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n.endswith("_ptr") or n.startswith("stride") or n in ("T", "Hq", "H")}
    src = triton.compiler.ASTSource(fn=kern, signature=sig, constexprs=const, attrs=aligned)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout.splitlines()


def unmasked_tile(lines: list[str]) -> collections.Counter:
    """Opcodes along the loop's path for an unmasked tile: the loop is the widest backward branch, the masking code
    what its first forward branch skips."""
    ins = [(i, m.group(1)) for i, line in enumerate(lines) if (m := INS.match(line))]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    jumps = [(i, labels[m.group(1)]) for i, line in enumerate(lines) if (m := BRA.search(line))]
    start, end = max(((t, i) for i, t in jumps if t < i), key=lambda se: se[1] - se[0])
    # the first forward branch in the loop jumps over the masking: to the code after it (one layout), or to the
    # unmasked copy of the tile's work (the other: [common][masked, then a jump over][unmasked][tail])
    b, t = min((i, t) for i, t in jumps if start <= i < end and t > i)
    skip = range(b + 1, t)
    return collections.Counter(op.split(".")[0] for i, op in ins
                               if start <= i <= end and i not in skip)


def report(label: str, mod) -> int:
    total = 0
    for name, kern, flags in (("pass 1 (row sums)", mod._prefill_row_stats, {"WEIGHT": True, "FIXED_M": True}),
                              ("pass 1, no LSE", mod._prefill_row_stats, {"WEIGHT": True, "FIXED_M": False}),
                              ("pass 2 (column sums)", mod._prefill_col_sums, {"WEIGHT": True, "FIXED_M": False})):
        if "LSE" in name and "FIXED_M" not in kern.arg_names:
            continue
        c = unmasked_tile(sass(kern, **flags))
        n, q = sum(c.values()), sum(c[k] for k in QUARTER)
        total += n if "no LSE" not in name else 0
        print(f"{label:4s} {name:22s} {n:4d} instructions a tile a thread ({n / 16:.1f} an element), "
              f"quarter-rate {q / 16:.1f} an element", flush=True)
    return total


if __name__ == "__main__":
    new = report("new", importlib.import_module("kvstream.kernels.prefill_scores"))
    if len(sys.argv) > 1:
        sys.path.insert(0, sys.argv[1])
        old = report("old", importlib.import_module("prefill_scores_old"))
        print(f"both passes: old {old}, new {new} instructions a tile a thread: {old / new:.2f}x fewer")
