#!/usr/bin/env python3
"""Atomic instructions executed per request, from a callgrind profile.

usage: count_atomics.py BINARY CALLGRIND_OUT REQUESTS [TOP]

Run the proxy under `valgrind --tool=callgrind --dump-instr=yes`, zero the counters once it is up
(`callgrind_control -z`), put the load through it, dump (`callgrind_control -d`), and pass the dump
and the number of requests the load generator completed. The script disassembles BINARY
(`objdump -d`), takes the addresses of `lock`-prefixed instructions and of `xchg` with a memory
operand (atomic read-modify-writes), and sums callgrind's execution counts at those addresses.
With TOP, it also prints the TOP hottest sites with their inlined call chains (`addr2line -i`).

`perf` has no cycle counters on the development VM; this is how the atomics per call
(benches/load/README.md) were counted.
"""
import collections
import os
import re
import subprocess
import sys


def atomic_addresses(binary):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary],
                         capture_output=True, text=True, check=True).stdout
    addrs = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(\S*)", line)
        if not m:
            continue
        op, arg = m.group(2), m.group(3)
        if op == "lock" or (op.startswith("xchg") and "(" in arg):
            addrs.add(int(m.group(1), 16))
    return addrs


def counts_at(profile, object_name, addrs):
    """Self execution counts per instruction address of `object_name`, from a callgrind dump."""
    names = {}
    obj = None
    pos = line = 0
    after_call = False
    counts = collections.Counter()

    def parse(tok, prev):
        if tok == "*":
            return prev
        if tok.startswith("0x"):
            return int(tok, 16)
        if tok[0] in "+-":
            return prev + int(tok)
        return int(tok)

    with open(profile) as f:
        for raw in f:
            if raw.startswith(("ob=", "cob=")):
                m = re.match(r"c?ob=\((\d+)\)(?: (.*))?", raw.strip())
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                if raw.startswith("ob="):
                    obj = names[m.group(1)]
                continue
            if raw.startswith("calls="):
                after_call = True
                continue
            if raw[0] == "0" or raw[0] in "+-*":
                parts = raw.split()
                if len(parts) < 3:
                    continue
                pos = parse(parts[0], pos)
                line = parse(parts[1], line)
                if after_call:  # the inclusive cost of a call, not this instruction's own
                    after_call = False
                    continue
                if obj and os.path.basename(obj) == object_name and pos in addrs:
                    counts[pos] += int(parts[2])
    return counts


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    binary, profile, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    counts = counts_at(profile, os.path.basename(binary), atomic_addresses(binary))
    print(f"atomic instructions per request: {sum(counts.values()) / requests:.1f}")
    for addr, n in counts.most_common(top):
        chain = subprocess.run(["addr2line", "-i", "-f", "-C", "-e", binary, hex(addr)],
                               capture_output=True, text=True).stdout.splitlines()
        frames = [chain[i] for i in range(0, len(chain), 2)]
        frames = [f for f in frames if "atomic" not in f and "futex" not in f][:3]
        print(f"{n / requests:7.2f}  " + "  <  ".join(fr[:80] for fr in frames))


if __name__ == "__main__":
    main()
