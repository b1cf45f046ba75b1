"""benchmarks/gpu_model.py: the kernel/bytes accounting of compiled HLO and the H200 model.

The accounting is checked against hand-worked HLO text (here, no plugin needed) and against a
program compiled for the H200 whose single fusion's size is known. The compiling checks run in
the venv with the CUDA plugin that benchmarks/gpu_model_venv.sh makes (`.venv-gpu-model`, or
`$GPU_MODEL_PYTHON`); they are skipped when it does not exist.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "gpu_model.py")
GPU_PYTHON = os.environ.get("GPU_MODEL_PYTHON", os.path.join(ROOT, ".venv-gpu-model/bin/python"))


def _load():
    sys.path.insert(0, os.path.dirname(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_model", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_model"] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(BENCH))
    return module


gpu_model = _load()

# Two kernels by hand: a fusion that slices rows 0:100 of x (f32[1000,256]) and reads all of y
# (f32[1000,256]), writing f32[100]; and a cuBLAS call reading x, y, writing f32[1000,1000] plus
# an 8 MiB workspace (not counted). A tuple, a parameter and a bitcast launch nothing.
HLO = """\
HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[1000,256]{1,0})->f32[100]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_reduce (param_0.5: f32[1000,256], param_1.9: f32[1000,256]) -> f32[100] {
  %param_1.9 = f32[1000,256]{1,0} parameter(1)
  %slice.2 = f32[100,256]{1,0} slice(%param_1.9), slice={[0:100], [0:256]}
  %param_0.5 = f32[1000,256]{1,0} parameter(0)
  %neg = f32[1000,256]{1,0} negate(%param_0.5)
  %slice.3 = f32[100,256]{1,0} slice(%neg), slice={[0:100], [0:256]}
  %sum = f32[100,256]{1,0} add(%slice.2, %slice.3)
  %zero = f32[] constant(0)
  ROOT %r = f32[100]{0} reduce(%sum, %zero), dimensions={1}, to_apply=%add
}

ENTRY %main.2 (x.1: f32[1000,256], y.1: f32[1000,256]) -> (f32[100], f32[1000,1000]) {
  %y.1 = f32[1000,256]{1,0} parameter(1), metadata={op_name="y"}
  %x.1 = f32[1000,256]{1,0} parameter(0), metadata={op_name="x"}
  %fusion = f32[100]{0} fusion(%y.1, %x.1), kind=kInput, calls=%fused_reduce, metadata={a="b"}
  %gemm = (f32[1000,1000]{1,0}, s8[8388608]{0}) custom-call(%x.1, %y.1), custom_call_target="gemm"
  %gte = f32[1000,1000]{1,0} get-tuple-element(%gemm), index=0
  %bc = f32[1000000]{0} bitcast(%gte)
  ROOT %t = (f32[100]{0}, f32[1000000]{0}) tuple(%fusion, %bc)
}
"""


def test_kernels_and_bytes_of_hand_worked_hlo():
    ks = gpu_model.kernels(HLO)
    assert [(k.name, k.opcode) for k in ks] == [("fusion", "fusion"), ("gemm", "custom-call")]
    full, rows = 1000 * 256 * 4, 100 * 256 * 4
    # Operand 0 (y) is only sliced: 100 rows read; operand 1 (x) is negated whole: all read.
    assert ks[0].bytes == rows + full + 100 * 4
    # The workspace is s8 here, not u8: it counts (only a trailing u8 array is scratch).
    assert ks[1].bytes == 2 * full + 1000 * 1000 * 4 + 8388608


# A conditional whose true branch is one kernel over the whole of p (f32[10000000]: 40 MB read
# and written) and whose false branch gathers 10 entries of p (through a bitcast) and scatters 10
# values into a buffer in place: the false branch is the cheaper one.
COND_HLO = """\
HloModule jit_g, is_scheduled=true

%fused_double (param_0: f32[10000000]) -> f32[10000000] {
  %param_0 = f32[10000000]{0} parameter(0)
  ROOT %d = f32[10000000]{0} add(%param_0, %param_0)
}

%fused_gather (param_0.1: f32[10000000], param_1.1: s32[10,1]) -> f32[10] {
  %param_0.1 = f32[10000000]{0} parameter(0)
  %view = f32[1000,10000]{1,0} bitcast(%param_0.1)
  %flat = f32[10000000]{0} bitcast(%view)
  %param_1.1 = s32[10,1]{1,0} parameter(1)
  %g = f32[10,1]{1,0} gather(%flat, %param_1.1), slice_sizes={1}
  ROOT %b = f32[10]{0} bitcast(%g)
}

%assign (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  ROOT %y = f32[] parameter(1)
}

%fused_scatter (param_0.2: f32[10000000], param_1.2: s32[10,1], u: f32[10]) -> f32[10000000] {
  %param_0.2 = f32[10000000]{0} parameter(0)
  %param_1.2 = s32[10,1]{1,0} parameter(1)
  %u = f32[10]{0} parameter(2)
  ROOT %s = f32[10000000]{0} scatter(%param_0.2, %param_1.2, %u), to_apply=%assign
}

%yes (t: (f32[10000000], s32[10,1])) -> f32[10000000] {
  %t = (f32[10000000]{0}, s32[10,1]{1,0}) parameter(0)
  %p.t = f32[10000000]{0} get-tuple-element(%t), index=0
  ROOT %fusion.t = f32[10000000]{0} fusion(%p.t), kind=kLoop, calls=%fused_double
}

%no (f: (f32[10000000], s32[10,1])) -> f32[10000000] {
  %f = (f32[10000000]{0}, s32[10,1]{1,0}) parameter(0)
  %p.f = f32[10000000]{0} get-tuple-element(%f), index=0
  %i.f = s32[10,1]{1,0} get-tuple-element(%f), index=1
  %fusion.g = f32[10]{0} fusion(%p.f, %i.f), kind=kLoop, calls=%fused_gather
  ROOT %fusion.s = f32[10000000]{0} fusion(%p.f, %i.f, %fusion.g), kind=kInput, calls=%fused_scatter
}

ENTRY %main (p: f32[10000000], i: s32[10,1], c: pred[]) -> f32[10000000] {
  %p = f32[10000000]{0} parameter(0)
  %i = s32[10,1]{1,0} parameter(1)
  %c = pred[] parameter(2)
  %a = (f32[10000000]{0}, s32[10,1]{1,0}) tuple(%p, %i)
  ROOT %cond = f32[10000000] conditional(%c, %a, %a), true_computation=%yes, false_computation=%no
}
"""


def test_a_conditional_counts_its_cheapest_branch_and_gathers_and_scatters_count_sectors():
    ks = gpu_model.kernels(COND_HLO)
    assert [k.name for k in ks] == ["cond", "fusion.g", "fusion.s"]
    assert ks[0].bytes == 1  # the predicate, sent to the host
    # 10 gathered entries: a 32-byte sector each, not the 40 MB of p; plus indices and result.
    assert ks[1].bytes == 10 * 32 + 10 * 4 + 10 * 4
    # In place: nothing of the buffer read; 10 sectors written; indices and updates read.
    assert ks[2].bytes == 10 * 4 + 10 * 4 + 10 * 32
    assert gpu_model.conditionals(COND_HLO) == 1
    # The branch list of the other spelling (`branch_computations`) is read the same way.
    listed = COND_HLO.replace(
        "true_computation=%yes, false_computation=%no",
        "branch_computations={%yes, %no}",
    )
    assert gpu_model.kernels(listed) == ks


# A strided sample (every 127th of 127,000 floats), a gather of a fused concatenate of two
# arrays, a gather of contiguous runs of 32 words, and an update of 1,000 bytes in place.
READS_HLO = """\
HloModule jit_h, is_scheduled=true

%fused_sample (param_0: f32[127000]) -> f32[1000] {
  %param_0 = f32[127000]{0} parameter(0)
  ROOT %s = f32[1000]{0} slice(%param_0), slice={[0:127000:127]}
}

%fused_take (param_0.1: f32[4000000], param_1.1: f32[6000000], param_2.1: s32[100,1]) -> f32[100] {
  %param_0.1 = f32[4000000]{0} parameter(0)
  %param_1.1 = f32[6000000]{0} parameter(1)
  %cat = f32[10000000]{0} concatenate(%param_0.1, %param_1.1), dimensions={0}
  %param_2.1 = s32[100,1]{1,0} parameter(2)
  %g = f32[100,1]{1,0} gather(%cat, %param_2.1), slice_sizes={1}
  ROOT %b = f32[100]{0} bitcast(%g)
}

%fused_block (param_0.2: u32[100000,32], param_1.2: s32[10,1]) -> u32[10,32] {
  %param_0.2 = u32[100000,32]{1,0} parameter(0)
  %param_1.2 = s32[10,1]{1,0} parameter(1)
  ROOT %g.2 = u32[10,32]{1,0} gather(%param_0.2, %param_1.2), slice_sizes={1,32}
}

%fused_update (param_0.3: u8[1000000], param_1.3: u8[1000], param_2.3: s32[]) -> u8[1000000] {
  %param_0.3 = u8[1000000]{0} parameter(0)
  %param_1.3 = u8[1000]{0} parameter(1)
  %param_2.3 = s32[] parameter(2)
  ROOT %u = u8[1000000]{0} dynamic-update-slice(%param_0.3, %param_1.3, %param_2.3)
}

ENTRY %main (x: f32[127000], a: f32[4000000], b: f32[6000000], i: s32[100,1]) -> u8[1000000] {
  %x = f32[127000]{0} parameter(0)
  %a = f32[4000000]{0} parameter(1)
  %b = f32[6000000]{0} parameter(2)
  %i = s32[100,1]{1,0} parameter(3)
  %w = u32[100000,32]{1,0} parameter(4)
  %j = s32[10,1]{1,0} parameter(5)
  %c = u8[1000000]{0} parameter(6)
  %v = u8[1000]{0} parameter(7)
  %o = s32[] parameter(8)
  %f.sample = f32[1000]{0} fusion(%x), kind=kLoop, calls=%fused_sample
  %f.take = f32[100]{0} fusion(%a, %b, %i), kind=kLoop, calls=%fused_take
  %f.block = u32[10,32]{1,0} fusion(%w, %j), kind=kLoop, calls=%fused_block
  ROOT %f.update = u8[1000000]{0} fusion(%c, %v, %o), kind=kLoop, calls=%fused_update
}
"""


def test_strided_samples_concatenated_gathers_runs_and_updates_in_place_count_what_they_move():
    ks = {k.name: k.bytes for k in gpu_model.kernels(READS_HLO)}
    # 1,000 samples 508 bytes apart: a 32-byte sector each (not 4 bytes, not the 508 KB array).
    assert ks["f.sample"] == 1000 * 32 + 1000 * 4
    # 100 entries gathered from the two arrays laid end to end: 100 sectors in all, shared by
    # the two in proportion to their sizes; plus indices and result.
    assert ks["f.take"] == round(100 * 32 * 0.4) + round(100 * 32 * 0.6) + 100 * 4 + 100 * 4
    # 10 runs of 32 contiguous words (128 bytes: four sectors each), indices, result.
    assert ks["f.block"] == 10 * 4 * 32 + 10 * 4 + 10 * 32 * 4
    # The buffer is not read; the update is read and written; the offset.
    assert ks["f.update"] == 1000 + 1000 + 4


def test_custom_call_workspace_is_not_counted():
    text = HLO.replace("s8[8388608]", "u8[8388608]")
    assert gpu_model.kernels(text)[1].bytes == 2 * 1000 * 256 * 4 + 1000 * 1000 * 4


def test_time_model():
    ks = [gpu_model.Kernel("a", "fusion", 3_000_000), gpu_model.Kernel("b", "fusion", 30)]
    # 3 MB at 3 TB/s is 1 us, below the 3 us floor; the tiny kernel takes the floor too.
    assert gpu_model.modelled_seconds(ks, 3.0e12, 3e-6) == pytest.approx(6e-6)
    ks[0].bytes = 30_000_000_000  # 10 ms
    assert gpu_model.modelled_seconds(ks, 3.0e12, 3e-6) == pytest.approx(10e-3 + 3e-6)
    assert gpu_model.array_bytes("(bf16[2,3]{1,0}, pred[7], s32[])") == 12 + 7 + 4


needs_plugin = pytest.mark.skipif(
    not os.path.exists(GPU_PYTHON),
    reason=f"no {GPU_PYTHON}: make it with `bash benchmarks/gpu_model_venv.sh`",
)

# Compiled for the H200: an elementwise map of f32[1000,256] is one loop fusion that reads and
# writes 1,024,000 bytes each; a sum over its first 100 rows reads 102,400 of them.
PROBE = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(BENCH)!r})
import jax, jax.numpy as jnp
import gpu_model
s = gpu_model.h200_sharding()
x = jax.ShapeDtypeStruct((1000, 256), jnp.float32, sharding=s)
out = {{}}
for name, fn in [("map", lambda x: x * 2 + 1), ("rows", lambda x: jnp.sum(x[:100] * 2))]:
    ks = gpu_model.kernels(gpu_model.compiled_text(fn, x))
    out[name] = [[k.opcode, k.bytes] for k in ks]
print(json.dumps(out))
"""


def _run(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run(
        [GPU_PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw
    )


@needs_plugin
def test_compiled_elementwise_fusion_matches_hand_count():
    proc = _run(["-c", PROBE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["map"] == [["fusion", 2 * 1000 * 256 * 4]]
    # XLA sums the 25,600 entries in two kernels: p partial sums of the 100 rows read, then
    # their sum. The slice counts at the 102,400 bytes read, not the 1,024,000 of x.
    (op1, first), (op2, second) = out["rows"]
    partials = (second - 4) // 4
    assert (op1, op2) == ("fusion", "fusion") and partials >= 1
    assert first == 100 * 256 * 4 + 4 * partials and second == 4 * partials + 4


@needs_plugin
def test_benchmark_runs_and_is_deterministic(tmp_path):
    tables = []
    for i in range(2):  # two processes: two compilations, no cache shared
        out = tmp_path / f"t{i}.txt"
        args = [BENCH, "--quick", "--programs", "topk", "--patterns", "unstructured"]
        proc = _run([*args, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = out.read_text().splitlines()
        table = lines[lines.index("") + 1 :]
        tables.append(table)
    assert tables[0] == tables[1]
    rows = {line.split()[2]: line.split() for line in tables[0][2:]}
    assert set(rows) == {"topk"}
    for cells in rows.values():
        kernels, mbytes = int(cells[-6]), float(cells[-5].replace(",", ""))
        ms3, ms4 = cells[-4], cells[-3]
        # Every kernel takes at least the floor: time >= kernels * 3 us (and 1.5 us).
        assert kernels > 0 and mbytes > 0
        assert float(ms3) >= kernels * 3e-3 - 1e-3 and float(ms4) >= kernels * 1.5e-3 - 1e-3


@needs_plugin
def test_a_language_model_compiles_its_dense_and_search_steps(tmp_path):
    """The Llama branch: the next-token dense step and a 2:4 search step, with their ratio."""
    out = tmp_path / "lm.txt"
    args = ["--models", "llama_tiny", "--dtype", "float32", "--patterns", "2:4"]
    proc = _run([BENCH, *args, "--programs", "dense", "search", "--rate", "0.5", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    rows = {" ".join(line.split()[2:-6]): line.split() for line in lines[lines.index("") + 3 :]}
    assert set(rows) == {"dense", "search 2:4 r=0.5"}
    dense, search = rows["dense"], rows["search 2:4 r=0.5"]
    # the search step adds the mask refresh and the scores' optimiser to the dense step
    assert int(search[-6]) > int(dense[-6])
    ratio = float(search[-2])
    assert ratio == pytest.approx(float(search[-4]) / float(dense[-4]), abs=2e-3) and ratio > 1
