"""What a compiled program's optimised HLO text says: its size (lines, fusions, kernels per
step), the bytes its collectives move per step, and its concatenates.

Each function reads ``compiled.as_text()`` and walks the program as it runs from ENTRY: a
while loop's body ``known_trip_count`` times (its condition once more; once each where XLA
does not know the count), a conditional by its costliest branch, the computations of calls
and async ops once per call. Only ``re`` and ``math``: the tests of every jax release read
programs with it.

    >>> text = "ENTRY %main (x: f32[8]) -> f32[8] {\\n  ROOT %s = f32[8]{0} all-reduce(%x)\\n}"
    >>> collective_bytes(text)  # one all-reduce of 8 floats
    32.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

# ---------------------------------------------------------------------------------------
# The program's computations, walked as they run.
# ---------------------------------------------------------------------------------------

# Instructions whose called computations run as part of the program (not fusion bodies or
# reductions' scalar functions): they are counted through, not as kernels of their own.
CONTROL = frozenset(("while", "conditional", "call", "async-start"))
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """The instruction lines of each computation of an HLO module's text, and ENTRY's name."""
    found: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line) if line[:1] not in ("", " ", "}") else None
        if header:
            current = header.group(2)
            found[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            found[current].append(line)
    return found, entry


def instruction(line: str) -> tuple[str, str, str] | None:
    """``(opcode, result type, operands)`` of an HLO instruction line, else None."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    start, depth = match.end() - 1, 0
    for i in range(start, len(line)):  # the operands: up to the matching parenthesis
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        if depth == 0:
            return match.group(2), match.group(1), line[start + 1 : i]
    return match.group(2), match.group(1), line[start + 1 :]


def per_run(text: str, cost: Callable[[str, str, str, str], float]) -> float:
    """The sum of ``cost(opcode, result, operands, computation)`` over the instructions one
    run of the program executes, walked from ENTRY (see the module's docstring); the
    instructions of :data:`CONTROL` are walked through, not costed."""
    found, entry = computations(text)

    def walk(name: str) -> float:
        total = 0.0
        for line in found.get(name, ()):
            parsed = instruction(line)
            if parsed is None:
                continue
            opcode = parsed[0]
            if opcode not in CONTROL:
                total += cost(*parsed, name)
                continue
            called = dict(_CALLED.findall(line))
            if opcode == "while":
                trip = _TRIP_COUNT.search(line)
                n = int(trip.group(1)) if trip else 1
                total += n * walk(called["body"]) + (n + 1) * walk(called["condition"])
            elif opcode == "conditional":
                branches = _BRANCHES.search(line)
                names = (
                    [b.strip().lstrip("%") for b in branches.group(1).split(",")]
                    if branches
                    else [called[k] for k in ("true_computation", "false_computation")]
                )
                total += max(walk(b) for b in names)
            else:  # call, async-start: the called computation
                total += walk(called.get("to_apply") or called["calls"])
        return total

    return walk(entry) if entry else 0.0


# ---------------------------------------------------------------------------------------
# Size: lines, fusions, kernels.
# ---------------------------------------------------------------------------------------

# Instructions that launch no device work: plumbing, and the second halves of async pairs.
NOT_KERNELS = frozenset(
    (
        "parameter",
        "constant",
        "tuple",
        "get-tuple-element",
        "bitcast",
        "after-all",
        "add-dependency",
        "opt-barrier",
        "domain",
        "async-update",
        "async-done",
        "copy-done",
        "all-reduce-done",
        "all-gather-done",
        "collective-permute-done",
        "send-done",
        "recv-done",
    )
)


def program_counts(text: str) -> dict[str, int]:
    """What a compiled program's optimised HLO text holds:

    - ``hlo_lines``: the lines of its computations (each one's header, instructions and
      closing brace; not the module's header line, nor its tables of source file names,
      functions and stack frames, whose length follows the Python call stack that traced
      the program);
    - ``fusions``: its ``fusion`` instructions (every kind: loop, input, output, custom),
      each counted once, in the computations the program runs as such (ENTRY, and the
      bodies, conditions and branches of its while loops, conditionals, calls and async
      ops), not inside fusions' own bodies (a nested fusion is part of its outer kernel);
    - ``kernels``: the instructions of those computations that launch device work per step
      (fusions, custom calls such as cuDNN/cuBLAS ones, unfused copies or reductions...; not
      parameters, constants, tuples, bitcasts, nor the ``-done`` halves of async pairs),
      counted per run (:func:`per_run`).

    On a GPU each kernel is a launch (a fusion is one kernel; a cuDNN convolution may be a
    few); XLA:CPU runs each as one thunk."""
    per_step = per_run(text, lambda opcode, *_: float(opcode not in NOT_KERNELS))
    found, _ = computations(text)
    lines = sum(len(instructions) + 2 for instructions in found.values())
    return {"hlo_lines": lines, "fusions": _fusions(found, text), "kernels": int(per_step)}


def _fusions(found: dict[str, list[str]], text: str) -> int:
    """The ``fusion`` instructions of the computations a run executes, each counted once."""
    _, entry = computations(text)
    reached: set[str] = set()
    stack = [entry] if entry else []
    while stack:
        name = stack.pop()
        if name in reached:
            continue
        reached.add(name)
        for line in found.get(name, ()):
            parsed = instruction(line)
            if parsed is not None and parsed[0] in CONTROL:
                branches = _BRANCHES.search(line)
                stack += [c for _, c in _CALLED.findall(line)]
                stack += (
                    [b.strip().lstrip("%") for b in branches.group(1).split(",")]
                    if branches
                    else []
                )
    opcodes = (instruction(line) for name in reached for line in found.get(name, ()))
    return sum(1 for parsed in opcodes if parsed is not None and parsed[0] == "fusion")


# ---------------------------------------------------------------------------------------
# Communication: the collectives' payloads; concatenates.
# ---------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    **dict.fromkeys(("pred", "s8", "u8"), 1.0),
    **dict.fromkeys(("s4", "u4"), 0.5),
    **dict.fromkeys(("s16", "u16", "f16", "bf16"), 2.0),
    **dict.fromkeys(("s32", "u32", "f32"), 4.0),
    **dict.fromkeys(("s64", "u64", "f64", "c64"), 8.0),
    "c128": 16.0,
}
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def _dtype_bytes(dtype: str) -> float:
    return 1.0 if dtype.startswith("f8") else DTYPE_BYTES.get(dtype, 0.0)


def shapes(text: str) -> list[tuple[float, int]]:
    """``(bytes per element, elements)`` of each array shape written in ``text``
    (``f32[256,1024]{1,0}``, tuples ``(f32[8]{0}, bf16[2,4]{1,0})``; ``token[]`` and unknown
    types have 0 bytes per element)."""
    return [
        (_dtype_bytes(t), math.prod(int(d) for d in dims.split(",") if d))
        for t, dims in _SHAPE.findall(text)
    ]


def collective_payload(opcode: str, result: str, operands: str, min_elements: int = 0) -> float:
    """The payload of one collective: the larger of its operands and its results (an
    all-gather's gathered result, a reduce-scatter's whole operand, an all-reduce's buffer),
    counting only arrays of at least ``min_elements`` elements. A ``-start`` op's result
    tuple also holds its operands (all-gather, collective-permute): not counted twice."""
    size = lambda text: sum(b * n for b, n in shapes(text) if n >= min_elements)
    ins, outs = size(operands), size(result)
    if opcode.endswith("-start") and opcode != "all-reduce-start":
        outs -= ins
    return max(ins, outs)


def collective_bytes(text: str, min_elements: int = 0) -> float:
    """The bytes one device's program moves in collectives per run: the payload
    (:func:`collective_payload`) of every all-reduce, all-gather, reduce-scatter, all-to-all
    and collective-permute (an async pair counted once, at its ``-start``), per run
    (:func:`per_run`). ``min_elements``: only arrays of at least that many elements (2 leaves
    out the scalars: a loss, a norm)."""
    wanted = {*COLLECTIVES, *(f"{c}-start" for c in COLLECTIVES)}

    def cost(opcode: str, result: str, operands: str, _: str) -> float:
        return (
            collective_payload(opcode, result, operands, min_elements) if opcode in wanted else 0.0
        )

    return per_run(text, cost)


def concatenates(text: str) -> list[int]:
    """The output element count of every ``concatenate`` in the program (fusion bodies
    included)."""
    counts = []
    for line in text.splitlines():
        parsed = instruction(line)
        if parsed is not None and parsed[0] == "concatenate":
            counts.append(sum(n for _, n in shapes(parsed[1])))
    return counts


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(
        __spec__, "python -m experiments.benchmark --sharded", "it reads compiled programs"
    )
