"""Modelled H200 time of the search step against the dense step, compiled on this CPU.

XLA compiles a program for an NVIDIA H200 without one (the CUDA plugin and the device
description `benchmarks/h200.txtpb`), with the GPU backend's real fusion passes. The compiled HLO
then says which kernels the program launches and how many bytes each one moves, and a time
model turns that into a time per step:

  every kernel (fusion, custom call: cuBLAS/cuDNN/CUB, copy, or any other op left unfused at
  the top level, inside called computations too) moves the bytes of its operands plus its
  outputs (an operand that the kernel only slices counts at the size it reads; a strided
  sample or a gathered entry, a 32-byte sector each, also through a fused concatenate; a
  scatter or dynamic-update-slice updates its buffer in place, a sector per scattered entry or
  the update written; the scratch workspace of a custom call is not counted) and takes
  `max(bytes / 3.0e12 B/s, 3 us)`;
  a conditional is one launch plus its cheapest branch (rows marked `(cond)`).

That model predicted ResNet-50's fp32 batch-256 dense training step at 64.97 ms (measured on
an H200: 65 ms) and its search step without the mask refresh at 64.16 ms (measured: 64 ms). The
optimistic variant (4.0e12 B/s, 1.5 us) is a lower bound. Only ratios measured in one run
(search / dense) are meant to be compared: the model ignores compute-bound kernels' FLOPs.

Programs per model (batch `--batch`, inputs as shapes only, nothing allocated):
  * `dense`: `step.train_step` (weight decay 5e-4, SGD momentum 0.9);
  * `no refresh`: `step.search_step` whose last link keeps the masks (benchmarks/step.py);
  * `search <pattern> r=<rate>`: `step.search_step` with `step.search_optimizer` (short
    restriction at the constant rate, the batched selection);
  * `refresh <pattern> r=<rate>`: `restriction.refresh_masks` alone (rate 1: the exact top-k
    with ties to the kept entries; below 1: the restricted refresh);
  * `topk`: `masks.topk_masks` of the scores alone (no current masks).
for the compute dtypes in `--dtype` (the refresh and top-k do not depend on it; their rows are
given once), patterns `unstructured` (sparsity 0.9) and `2:4`, budgets by the `uniform` rule
(the kernels do not depend on the per-layer counts, and a shape-only rule needs no weights).

Run it in the venv that has the CUDA plugin (benchmarks/gpu_model_venv.sh makes it):
  bash benchmarks/gpu_model_venv.sh
  JAX_PLATFORMS=cpu .venv-gpu-model/bin/python benchmarks/gpu_model.py
  JAX_PLATFORMS=cpu .venv-gpu-model/bin/python benchmarks/gpu_model.py --quick   # fmnist_cnn
  ... --models resnet50 --dtype float32 --patterns unstructured --programs refresh topk
  ... --kernels 'refresh unstructured r=1'    # also list that program's kernels
The table is printed and written to `--out` (default docs/results/gpu_model.txt; none with
`--out -`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax.models import llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import frozen_masks, machine_info, sgd_links  # noqa: E402  (benchmarks/step.py)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "h200.txtpb")
# Model name -> (classes, batch). Another model is one more entry here.
MODELS = {
    "resnet50": (1000, 256),
    "resnet32_w2": (10, 256),
    "vit_b16": (1000, 256),
    "fmnist_cnn": (10, 32),
    # Language models: (vocabulary, batch of windows of LM_WINDOW tokens); 50% sparsity.
    "smollm2_135m": (llama.SMOLLM2_135M.vocab_size, 16),
    "llama_tiny": (512, 4),
}
LANGUAGE_MODELS = {
    "smollm2_135m": ("smollm2_135m", {}),
    "llama_tiny": (
        "llama",
        {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4},
    ),
}
LM_WINDOW = 256
LM_SPARSITY = 0.5
DEFAULT_MODELS = ("resnet50", "resnet32_w2", "vit_b16", "smollm2_135m")
PROGRAMS = ("dense", "no_refresh", "search", "refresh", "topk")
PATTERNS = {"unstructured": (0.9, "unstructured"), "2:4": (0.5, "2:4")}
# A gathered or scattered entry moves one 32-byte sector of memory.
SECTOR = 32
# The time model: (bytes per second, seconds per kernel at least).
MODELS_OF_TIME = {"3 TB/s, 3 us": (3.0e12, 3e-6), "4 TB/s, 1.5 us": (4.0e12, 1.5e-6)}
CALIBRATED = MODELS_OF_TIME["3 TB/s, 3 us"]  # the one that matched measured H200 steps

# ---------------------------------------------------------------------------------------------
# Reading compiled HLO text.

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# Ops that launch nothing: views, tuples, constants, control (their callees are walked).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "call", "while",
         "conditional", "async-start", "async-done", "async-update", "domain"}  # fmt: skip
_SLICES = {"slice", "dynamic-slice"}
# Ops that update their first operand in place (it is not read).
_IN_PLACE = {"scatter", "dynamic-update-slice"}
# Of those, the ones whose called computations run as kernels of their own.
_CONTROL = {"call", "while", "conditional", "async-start"}


def array_bytes(shape: str, skip_last_u8: bool = False) -> int:
    """Bytes of every array in an HLO shape string (a tuple's elements summed)."""
    arrays = _ARRAY.findall(shape)
    if skip_last_u8 and len(arrays) > 1 and arrays[-1][0] == "u8":
        arrays = arrays[:-1]  # a custom call's scratch workspace
    total = 0
    for dtype, dims in arrays:
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    args: str  # the text inside the opcode's parentheses
    operands: list[str]
    attrs: str
    root: bool = False


def _split_shape(rest: str) -> tuple[str, str]:
    """`'(f32[2], s32[]) fusion(...)...'` -> the shape and what follows it."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _call_args(text: str) -> tuple[str, str]:
    """The text after an opcode's `(` -> its arguments and the attributes after them."""
    depth = 1
    for i, c in enumerate(text):
        depth += c in "({["
        depth -= c in ")}]"
        if depth == 0:
            return text[:i], text[i + 1 :]
    return text, ""


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Compiled HLO text -> ({computation: instructions}, entry computation name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEAD.match(line)
            if m and " = " not in line and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        shape, tail = _split_shape(m.group(3))
        opcode, _, rest = tail.partition("(")
        args, attrs = _call_args(rest)
        operands = re.findall(r"%([\w.\-]+)", args)
        comps[current].append(
            Instr(m.group(2), shape, opcode.strip(), args, operands, attrs, bool(m.group(1)))
        )
    return comps, entry


def _elements(shape: str) -> int:
    """Entries of the first array of an HLO shape string."""
    arrays = _ARRAY.findall(shape)
    return math.prod(int(d) for d in arrays[0][1].split(",") if d) if arrays else 0


def _slice_bytes(ins: Instr) -> int:
    """What a slice reads: its entries, or a 32-byte sector per entry where the minor dimension
    is strided by a sector or more (a strided sample)."""
    written = array_bytes(ins.shape)
    m = re.search(r"slice=\{(.*?)\}\s*(?:,|$)", ins.attrs)
    minor = re.findall(r"\[(\d+):(\d+)(?::(\d+))?\]", m.group(1)) if m else []
    stride = int(minor[-1][2] or 1) if minor else 1
    if stride == 1:
        return written
    entries = _elements(ins.shape)
    return entries * min(SECTOR, stride * (written // max(entries, 1)))


def _sliced_reads(fused: list[Instr]) -> dict[int, int]:
    """Parameter number -> bytes read, for the parameters that a fusion only slices or gathers
    from (a gathered entry reads one sector, whether the parameter is gathered from directly or
    through a concatenate fused into the gather), or only updates in place (a scatter's operand:
    nothing read)."""
    users: dict[str, list[Instr]] = {}
    for ins in fused:
        for op in ins.operands:
            users.setdefault(op, []).append(ins)
    by_name = {ins.name: ins for ins in fused}

    def through_views(name: str) -> list[tuple[str, Instr]]:
        """(what it uses, user) pairs of an instruction, looking through bitcasts."""
        out = []
        for u in users.get(name, []):
            out += through_views(u.name) if u.opcode == "bitcast" else [(name, u)]
        return out

    def gathered_from(name: str) -> bool:
        pairs = through_views(name)
        return bool(pairs) and all(u.opcode == "gather" and u.operands[0] == v for v, u in pairs)

    out = {}
    for ins in fused:
        pairs = through_views(ins.name)
        used = [u for _, u in pairs]
        if ins.opcode != "parameter" or not used:
            continue
        if len(used) == 1 and used[0].opcode == "concatenate" and gathered_from(used[0].name):
            # A gather of a fused concatenate reads a sector per entry, shared by its inputs.
            cat = used[0]
            sizes = [array_bytes(by_name[o].shape) if o in by_name else 0 for o in cat.operands]
            entries = sum(_elements(u.shape) for _, u in through_views(cat.name))
            share = array_bytes(ins.shape) / max(sum(sizes), 1)
            out[int(ins.args)] = round(min(sum(sizes), SECTOR * entries) * share)
            continue
        if any(u.operands[0] != v for v, u in pairs):
            continue
        if all(u.opcode in _SLICES for u in used):
            out[int(ins.args)] = sum(_slice_bytes(u) for u in used)
        elif all(u.opcode == "gather" for u in used):
            out[int(ins.args)] = sum(
                _gathered_bytes(ins.shape, _elements(u.shape), _gather_run(u)) for u in used
            )
        elif all(u.opcode in _IN_PLACE for u in used):
            out[int(ins.args)] = 0
    return out


def _scattered_writes(fused: list[Instr], written: int) -> int:
    """A fusion whose result is a scatter writes one sector per update, at most its output; one
    whose result is a dynamic-update-slice writes the update."""
    root = next((ins for ins in fused if ins.root), None)
    shapes = {ins.name: ins.shape for ins in fused}
    if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        return min(written, array_bytes(shapes.get(root.operands[1], "")))
    if root is None or root.opcode != "scatter" or len(root.operands) < 3:
        return written
    return min(written, SECTOR * _elements(shapes.get(root.operands[2], "")))


@dataclasses.dataclass
class Kernel:
    name: str
    opcode: str
    bytes: int


def _branches(ins: Instr) -> list[str]:
    """The computations a `conditional` chooses between, in order."""
    listed = re.search(r"branch_computations=\{([%\w.\-, ]+)\}", ins.attrs)
    if listed:
        return [c.strip().lstrip("%") for c in listed.group(1).split(",")]
    return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", ins.attrs)


def _gathered_bytes(gathered: str, elements: int, run: int = 1) -> int:
    """What a gather of `elements` entries reads of an operand: the 32-byte sectors of every
    contiguous run of `run` entries (one entry per run: a sector each), at most the whole
    operand."""
    size = array_bytes(gathered) // max(_elements(gathered), 1)
    runs = elements // max(run, 1)
    return min(array_bytes(gathered), runs * SECTOR * -(-run * size // SECTOR))


def _gather_run(ins: Instr) -> int:
    """Entries a gather reads contiguously per index: its slice's minor size."""
    m = re.search(r"slice_sizes=\{([\d,]*)\}", ins.attrs)
    sizes = [int(d) for d in m.group(1).split(",") if d] if m else []
    return sizes[-1] if sizes else 1


def kernels(text: str) -> list[Kernel]:
    """The kernels a compiled program launches, in order, with the bytes each one moves.

    A `conditional` counts as one launch (its predicate goes to the host) plus the kernels of
    its cheapest branch under the calibrated model: the branch a program takes in its common
    case (the restricted refresh's compacted swaps); `conditionals` says which programs have one.
    """
    comps, entry = parse_hlo(text)

    def walk(comp: str, out: list[Kernel]) -> list[Kernel]:
        shapes = {ins.name: ins.shape for ins in comps[comp]}
        for ins in comps[comp]:
            if ins.opcode == "conditional":
                out.append(
                    Kernel(ins.name, ins.opcode, array_bytes(shapes.get(ins.operands[0], "")))
                )
                branches = [walk(c, []) for c in _branches(ins) if c in comps]
                out.extend(min(branches, key=lambda ks: modelled_seconds(ks, *CALIBRATED)))
                continue
            callees = re.findall(
                r"(?:calls|body|condition|to_apply|called_computations)=\{?([%\w.\-, ]+)\}?",
                ins.attrs,
            )
            callees = [c.strip().lstrip("%") for group in callees for c in group.split(",")]
            if ins.opcode in _FREE:
                if ins.opcode in _CONTROL:
                    for c in callees:
                        if c in comps:
                            walk(c, out)
                continue
            read = [array_bytes(shapes.get(op, "")) for op in ins.operands]
            written = array_bytes(ins.shape, skip_last_u8=ins.opcode == "custom-call")
            if ins.opcode == "fusion" and callees and callees[0] in comps:
                for number, size in _sliced_reads(comps[callees[0]]).items():
                    if number < len(read):
                        read[number] = min(read[number], size)
                written = _scattered_writes(comps[callees[0]], written)
            elif ins.opcode == "gather" and read:
                read[0] = _gathered_bytes(
                    shapes.get(ins.operands[0], ""), _elements(ins.shape), _gather_run(ins)
                )
            elif ins.opcode == "scatter" and len(read) >= 3:
                read[0] = 0  # updated in place: only the written entries move
                written = min(written, SECTOR * _elements(shapes.get(ins.operands[2], "")))
            out.append(Kernel(ins.name, ins.opcode, sum(read) + written))
        return out

    return walk(entry, [])


def conditionals(text: str) -> int:
    """How many `conditional`s the program holds (only the cheapest branch of each is counted)."""
    comps, _ = parse_hlo(text)
    return sum(ins.opcode == "conditional" for body in comps.values() for ins in body)


def loops(text: str) -> int:
    """How many `while` loops the program holds (their bodies are counted once, not per trip)."""
    comps, _ = parse_hlo(text)
    return sum(ins.opcode == "while" for body in comps.values() for ins in body)


def modelled_seconds(ks: list[Kernel], bandwidth: float, floor: float) -> float:
    """The time model: every kernel takes `max(bytes / bandwidth, floor)`."""
    return sum(max(k.bytes / bandwidth, floor) for k in ks)


# ---------------------------------------------------------------------------------------------
# The programs, as shapes on the H200 target.


def h200_sharding(target: str = TARGET) -> jax.sharding.Sharding:
    """A single-device sharding on an H200 that XLA compiles for without one."""
    from jax.experimental import topologies

    with open(target) as f:
        config = f.read()
    topo = topologies.get_topology_desc(
        platform="cuda", topology_name="h200", target_config=config, topology="1x1x1"
    )
    return jax.sharding.SingleDeviceSharding(topo.devices[0])


def on(sharding, tree):
    """`tree`'s arrays as `ShapeDtypeStruct`s placed by `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _image_model(name: str, dtype: str, batch: int):
    """`(params, batch_stats, step keywords, batch shapes, budget keywords)` of an image model
    (Linen or NNX alike, through `models.network`)."""
    network = models.network(name, MODELS[name][0], dtype)
    shape = models.input_shape(name)
    images = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    batch_shapes = {"image": images, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    variables = network.abstract_variables()
    params, stats = variables["params"], variables["batch_stats"]
    return params, stats, {"apply_fn": network.apply_fn}, batch_shapes, {}


def _language_model(name: str, dtype: str, batch: int):
    """The same for a Llama: windows of `LM_WINDOW` tokens, the next-token loss."""
    family, options = LANGUAGE_MODELS[name]
    network = models.network(family, MODELS[name][0], jnp.dtype(dtype), **options)
    params = jax.eval_shape(lambda k: network.init(k)[0], jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, LM_WINDOW), jnp.int32)
    batch_shapes = {
        "inputs": tokens,
        "targets": tokens,
        "weights": jax.ShapeDtypeStruct((batch, LM_WINDOW), jnp.float32),
    }
    step_kw = {
        "apply_fn": network.apply_fn,
        "loss_fn": jj.losses.next_token(),
        "inputs": "inputs",
    }
    return params, {}, step_kw, batch_shapes, {"dense": llama.DENSE}


def model_programs(name: str, dtype: str, patterns, rates, programs, batch: int, with_dtype_free):
    """Yields `(program name, function, argument shapes)` of one model and compute dtype."""
    language = name in LANGUAGE_MODELS
    setup = _language_model if language else _image_model
    params, stats, step_kw, batch_shapes, budget_kw = setup(name, dtype, batch)
    kw = dict(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, total_steps=1000)
    dense_tx = optax.chain(*sgd_links())
    if "dense" in programs:
        state = jax.eval_shape(lambda p: jj.engine.create_train_state(p, stats, dense_tx), params)
        yield (
            "dense",
            lambda s, b: jj.engine.train_step(s, b, tx=dense_tx, **step_kw),
            (state, batch_shapes),
        )
    for pattern in patterns:
        sparsity, kind = PATTERNS[pattern]
        sparsity = LM_SPARSITY if language else sparsity
        budget = jj.layer_budgets(
            params, sparsity, "uniform", pattern=kind, indivisible="dense", **budget_kw
        )
        scores = jax.eval_shape(lambda p, b=budget: jj.init_scores(p, b, "magnitude")[0], params)
        if "no_refresh" in programs and pattern == patterns[0]:
            tx = optax.chain(*sgd_links(), frozen_masks(budget))
            state = jax.eval_shape(
                lambda s, tx=tx: jj.engine.create_search_state(s, tx, batch_stats=stats), scores
            )
            yield (
                "no refresh",
                lambda s, p, b, tx=tx: jj.engine.search_step(s, p, b, tx=tx, **step_kw),
                (state, params, batch_shapes),
            )
        for rate in rates:
            tx = jj.search_optimizer(budget, rate=rate, selection="batched", **kw)
            state = jax.eval_shape(
                lambda s, tx=tx: jj.engine.create_search_state(s, tx, batch_stats=stats), scores
            )
            if "search" in programs:
                yield (
                    f"search {pattern} r={rate:g}",
                    lambda s, p, b, tx=tx: jj.engine.search_step(s, p, b, tx=tx, **step_kw),
                    (state, params, batch_shapes),
                )
            if "refresh" in programs and with_dtype_free:
                masks = jj.current_masks(state.opt_state)
                yield (
                    f"refresh {pattern} r={rate:g}",
                    lambda s, m, b=budget, r=rate: jj.refresh_masks(
                        s, m, b, r, selection="batched"
                    ),
                    (scores, masks),
                )
        if "topk" in programs and with_dtype_free:
            yield (
                f"topk {pattern}",
                lambda s, b=budget: jj.topk_masks(s, b, selection="batched"),
                (scores,),
            )


@dataclasses.dataclass
class Row:
    model: str
    dtype: str
    program: str
    kernels: int
    bytes: int
    seconds: tuple[float, ...]  # per time model
    loops: int
    conditionals: int
    compile_s: float


def measure(name, dtype, args, sharding, with_dtype_free, show):
    """Yields the `Row` of every program of one model and dtype, as each is compiled."""
    batch = args.batch or MODELS[name][1]
    for program, fn, shapes in model_programs(
        name, dtype, args.patterns, args.rate, args.programs, batch, with_dtype_free
    ):
        start = time.perf_counter()
        text = compiled_text(fn, *on(sharding, shapes))
        compile_s = time.perf_counter() - start
        ks = kernels(text)
        seconds = tuple(modelled_seconds(ks, *m) for m in MODELS_OF_TIME.values())
        row = Row(name, dtype, program, len(ks), sum(k.bytes for k in ks), seconds, loops(text),
                  conditionals(text), compile_s)  # fmt: skip
        print(f"  {name} {dtype} {program}: {len(ks)} kernels, {compile_s:.1f} s to compile",
              flush=True)  # fmt: skip
        if program in show:
            for k in ks:
                print(f"    {k.opcode:12s} {k.bytes:>14,d} B  {k.name}")
        yield row


def table(rows: list[Row]) -> str:
    """The results as a text table, with search/dense ratios of each (model, dtype)."""
    names = list(MODELS_OF_TIME)
    header = ("model", "dtype", "program", "kernels", "MB", *(f"ms ({n})" for n in names),
              *(f"/dense ({n})" for n in names))  # fmt: skip
    dense = {(r.model, r.dtype): r for r in rows if r.program == "dense"}
    lines = []
    for r in rows:
        d = dense.get((r.model, r.dtype)) or dense.get((r.model, "float32"))
        ratio = [
            f"{s / ds:.3f}" if d and r.program.split()[0] in ("search", "no") else "-"
            for s, ds in zip(r.seconds, d.seconds if d else r.seconds, strict=True)
        ]
        marks = (" (loops!)" if r.loops else "") + (" (cond)" if r.conditionals else "")
        lines.append((r.model, r.dtype, r.program + marks,
                      str(r.kernels), f"{r.bytes / 1e6:,.1f}",
                      *(f"{s * 1e3:.3f}" for s in r.seconds), *ratio))  # fmt: skip
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                         enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, lines)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rate", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument("--batch", type=int, default=None, help="default: per model (MODELS)")
    parser.add_argument("--quick", action="store_true", help="fmnist_cnn, float32 only")
    parser.add_argument("--kernels", nargs="*", default=[], help="programs whose kernels to list")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "results",
                                                      "gpu_model.txt"))  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.dtype = ["fmnist_cnn"], ["float32"]
    if jax.default_backend() != "cpu":
        sys.exit("run with JAX_PLATFORMS=cpu: the H200 is a compile target here, not a device")
    sharding = h200_sharding()
    start = time.perf_counter()
    rows = []
    for name in args.models:
        for i, dtype in enumerate(args.dtype):
            for row in measure(name, dtype, args, sharding, i == 0, set(args.kernels)):
                rows.append(row)
                # The table so far, on disk after every program: a long run stopped early
                # keeps what it measured.
                report(args, rows, start, argv, final=False)
    report(args, rows, start, argv, final=True)


def report(args, rows, start, argv, final: bool) -> None:
    """Prints the table (when `final`) and writes it to `args.out` (unless `-`)."""
    head = [
        "Modelled H200 time, compiled on the CPU for benchmarks/h200.txtpb "
        f"(jax {jax.__version__}). Model: per kernel max(bytes / B/s, floor), summed;",
        "calibrated at 3 TB/s, 3 us against measured H200 steps (ResNet-50 fp32 batch 256:",
        "dense 65 ms, search without refresh 64 ms); 4 TB/s, 1.5 us is the optimistic bound.",
        "Ratios: search (or no refresh) / dense of the same model and dtype, one run.",
        "'refresh' and 'topk' rows do not depend on the compute dtype.",
        "(cond): the program holds a conditional; its cheapest branch is counted (for the",
        "restricted refresh: the proposed swaps compacted, the common case), plus one launch.",
        "Command: "
        + (f"XLA_FLAGS={os.environ['XLA_FLAGS']} " if os.environ.get("XLA_FLAGS") else "")
        + " ".join(["benchmarks/gpu_model.py", *(argv or sys.argv[1:])]),
        f"Compiled on {machine_info()} in {time.perf_counter() - start:.0f} s.",
        "",
        table(rows),
    ]
    text = "\n".join(head if final else ["(unfinished run)", *head])
    if final:
        print(text)
    if args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
