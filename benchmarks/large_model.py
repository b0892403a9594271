"""Models whose weights live in an external file: onnxopt's normalize and quantize vs ORT's quantize_static. One run.

torch's dynamo exporter, and ``onnx.save(..., save_as_external_data=True)``, write a model's weights to a separate
file whatever its size. The models here are MLPs written that way: 4 x (MatMul + Add + Relu) of width W and a
10-class MatMul head, W = 2048 (~64 MB of weights), 4096 (~256 MB) and 12288 (~2.4 GB: over protobuf's 2 GB limit
for one message), with 32 seeded random calibration samples; and a model whose one 1-D weight of 2 GiB of zeros lives
in a sparse file (a Gather picks 4 values; no disk blocks, as in tests/test_reliability.py), run through
``onnxopt optimize`` with its default recipe.

Every run is its own subprocess (``nice -n 5``; ``optimize`` with ``--no-cache``: no pass result is reused), timed
from start to exit, its peak memory the child's own high-water mark (``VmHWM``, read while it runs:
``benchmarks/children.py``), so imports count alike for every row; a run is killed once its resident memory passes
16 GB (this host has 23 GB). Rows:

* ``onnxopt optimize --pass normalize``;
* ``onnxopt optimize --pass quantize`` (the pass alone, with its latency-aware placement search) and
  ``--pass quantize:placement=all`` (every op int8, no search);
* ``onnxopt quantize`` (the command: normalize, then quantize);
* ``onnxopt quantize`` again with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` set from the start: what malloc's
  transparent huge pages give or cost at each size (the command sets it itself only for models of 1 GiB and more,
  ``onnxopt.hugepages``);
* ORT's ``quantize_static`` (QDQ, MinMax, its defaults; ``use_external_data_format=True`` above 2 GB, which it
  needs there) on the same file and samples: the peer; and once more with that tunable;
* with ``--before REF``: the onnxopt rows again with the code of git ref ``REF`` (checked out in a temporary git
  worktree and put first on PYTHONPATH), so a change is measured side by side with what it replaced; the two
  versions take turns going first, and the model's files are read once before any timed run.

Beside them, for each width, what ORT's weight prepacking costs and buys (the figures behind
``onnxopt.runtime.PREPACK_SKIP_BYTES``): in one subprocess, the FP32 model's session created from its file with and
without prepacking, alternately, twice each (the faster creation is reported), and the median of 5 runs at batch 1
and at batch 16 in each session.

Each output is checked: exit code (and the error's last line), ONNX checker (full check), ORT load, and the number
of DequantizeLinear nodes (int8 placement). ``--no-latency`` for onnxopt: the rows time the passes, not the final
latency comparison.

Usage: nice -n 5 python benchmarks/large_model.py [--before REF] [--widths 2048,4096,12288] [--no-sparse]
       [--out reports/large_model.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(REPO / "tests"))  # onnx_builders: the 2 GiB sparse model of the tests
from children import wait_with_usage  # noqa: E402 - beside this script
from report_files import write_report  # noqa: E402

LAYERS = 4
CLASSES = 10
SAMPLES = 32
TIMEOUT_S = 1800
LIMIT_MB = 16000
PROTOBUF_LIMIT = 2**31
#: What the onnxopt command sets for itself (onnxopt.hugepages): the peer's row with it shows what the environment
#: alone gives ORT's quantizer.
HUGETLB = "glibc.malloc.hugetlb=1"
#: The command with the tunable whatever the model's size (it sets it itself from onnxopt.hugepages.RELAUNCH_FROM_BYTES).
FORCED = f"onnxopt quantize command, `GLIBC_TUNABLES={HUGETLB}` forced"


def build_mlp(folder: Path, width: int, seed: int = 0) -> tuple[Path, Path]:
    """``mlp.onnx`` with its weights in ``mlp.bin``, and ``calib.npz`` (input 'x')."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(LAYERS):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"W{i}"),
                  numpy_helper.from_array((0.01 * rng.standard_normal(width)).astype(np.float32), f"B{i}")]
        nodes += [helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"], name=f"matmul{i}"),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        current = f"r{i}"
    head = (rng.standard_normal((width, CLASSES)) / np.sqrt(width)).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "W_head"))
    nodes.append(helper.make_node("MatMul", [current, "W_head"], ["logits"], name="head"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="mlp.bin", size_threshold=1024)
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.standard_normal((SAMPLES, width)).astype(np.float32))
    return path, calib


def ort_worker(model: str, calib: str, out: str) -> None:
    """ORT's quantize_static with its defaults (QDQ, MinMax, per tensor) on every calibration sample."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    data = np.load(calib)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(data[i:i + 1] for i in range(len(data)))

        def get_next(self):  # noqa: ANN202 - ORT's interface
            row = next(self.rows, None)
            return None if row is None else {"x": row}

    size = sum(f.stat().st_size for f in Path(model).parent.iterdir() if f.suffix in (".onnx", ".bin"))
    quantize_static(model, out, Reader(), use_external_data_format=size >= PROTOBUF_LIMIT)


def prepack_worker(model: str, calib: str) -> None:
    """Prints session creation and run times (s) with and without ORT's weight prepacking, as JSON."""
    import onnxruntime as ort

    from onnxopt.runtime import session_options

    data = np.load(calib)["x"]
    out: dict[str, dict[str, list[float]]] = {}
    for _ in range(2):
        for prepack in (True, False):
            record = out.setdefault("on" if prepack else "off", {"create": [], "batch 1": [], "batch 16": []})
            started = time.perf_counter()
            session = ort.InferenceSession(model, session_options(prepack=prepack),
                                           providers=["CPUExecutionProvider"])
            record["create"].append(time.perf_counter() - started)
            for batch in (1, 16):
                feed = {"x": data[:batch]}
                session.run(None, feed)  # warm-up
                times = []
                for _ in range(5):
                    began = time.perf_counter()
                    session.run(None, feed)
                    times.append(time.perf_counter() - began)
                record[f"batch {batch}"].append(float(np.median(times)))
            del session
    print(json.dumps(out))


def measure_prepacking(model: Path, calib: Path) -> dict:
    out = subprocess.run(["nice", "-n", "5", sys.executable, str(Path(__file__).resolve()), "--prepack-worker",
                          str(model), str(calib)], capture_output=True, text=True, timeout=TIMEOUT_S)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> dict:
    """Wall time, peak RSS (MB) and exit code of ``argv``; the last non-empty output line on failure."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(["nice", "-n", "5", *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        code, usage, own_peak = wait_with_usage(proc, TIMEOUT_S, limit_mb=LIMIT_MB)
        log.seek(0)
        text = log.read().decode(errors="replace").replace("\r", "\n")
    result = {"exit": code, "seconds": round(time.perf_counter() - started, 2),
              "peak_mb": round(own_peak if own_peak is not None else usage.ru_maxrss / 1024)}
    if code != 0:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        result["error"] = (lines[-1] if lines else f"exit {code}")[:300]
        if code == -9 and result["peak_mb"] >= LIMIT_MB:
            result["error"] = f"killed: over {LIMIT_MB} MB resident"
    return result


def check_output(path: Path) -> dict:
    """:func:`check_output_here` in a subprocess: checking a 2.4 GB output leaves this process several GB larger,
    memory the runs after it would then share the machine with."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--check-output", str(path)],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    if out.returncode != 0:
        return {"valid": False, "invalid": f"checker process: {out.stderr.strip()[-200:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_output_here(path: Path) -> dict:
    """ONNX checker (full), ORT load, DequantizeLinear count and file sizes (model + external data)."""
    import onnx
    import onnxruntime as ort

    out: dict = {}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out["valid"] = True
    except Exception as exc:  # noqa: BLE001 - an invalid output is a result
        out["valid"], out["invalid"] = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    model = onnx.load(str(path), load_external_data=False)
    out["dequantize_nodes"] = sum(node.op_type == "DequantizeLinear" for node in model.graph.node)
    files = [path] + [path.parent / name for name in {e.value for i in model.graph.initializer
                                                      for e in i.external_data if e.key == "location"}]
    out["size_mb"] = round(sum(f.stat().st_size for f in files if f.exists()) / 1e6, 1)
    return out


def worktree(ref: str, folder: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=REPO, check=True,
                   capture_output=True)
    return folder


def measure(width: int, workdir: Path, versions: list[tuple[str, Path | None]]) -> dict:
    folder = workdir / f"w{width}"
    folder.mkdir()
    model, calib = build_mlp(folder, width)
    weights_mb = round(sum(p.stat().st_size for p in (model, folder / "mlp.bin")) / 1e6, 1)
    runs = [("onnxopt normalize", ["optimize", "--pass", "normalize"]),
            ("onnxopt quantize pass (placement auto)", ["optimize", "--pass", "quantize"]),
            ("onnxopt quantize pass (placement all)", ["optimize", "--pass", "quantize:placement=all"]),
            ("onnxopt quantize command (normalize, quantize)", ["quantize"])]
    rows = onnxopt_rows(f"w{width}", model, runs, versions, ["--calib", str(calib)])
    forced = onnxopt_rows(f"w{width}", model, [(FORCED, ["quantize"])], versions[:1], ["--calib", str(calib)],
                          env={"GLIBC_TUNABLES": HUGETLB})  # set from the start: the command does not restart
    rows += forced
    prepacking = measure_prepacking(model, calib)
    print(f"  w{width}: prepacking: {json.dumps(prepacking)}", file=sys.stderr, flush=True)
    for label, env in (("ORT quantize_static (QDQ MinMax defaults)", None),
                       (f"ORT quantize_static (QDQ MinMax defaults), `GLIBC_TUNABLES={HUGETLB}`",
                        {**os.environ, "GLIBC_TUNABLES": HUGETLB})):
        out = folder / "ort.onnx"
        result = run([sys.executable, str(Path(__file__).resolve()), "--ort-worker", str(model), str(calib),
                      str(out)], env=env)
        if result["exit"] == 0 and out.exists():
            result.update(check_output(out))
        for leftover in folder.glob("ort.onnx*"):
            leftover.unlink()
        rows.append({"row": label, "code": "onnxruntime", **result})
        print(f"  w{width}: {label}: {json.dumps(result)}", file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return {"title": f"W = {width} ({weights_mb} MB on disk)", "rows": rows, "prepacking": prepacking}


def measure_sparse(workdir: Path, versions: list[tuple[str, Path | None]]) -> dict:
    """The default recipe on the 2 GiB sparse Gather model (no calibration data, no quantizer to compare with)."""
    folder = workdir / "sparse"
    folder.mkdir()
    from onnx_builders import sparse_gather_model  # tests/: the model test_reliability.py runs

    model, _ = sparse_gather_model(folder)
    rows = onnxopt_rows("sparse", model, [("onnxopt optimize (default recipe)", ["optimize"])], versions, [])
    shutil.rmtree(folder, ignore_errors=True)
    return {"title": "1-D weight of 2 GiB in a sparse file (Gather of 4 values)", "rows": rows}


def onnxopt_rows(tag: str, model: Path, runs: list[tuple[str, list[str]]], versions: list[tuple[str, Path | None]],
                 data_args: list[str], env: dict[str, str] | None = None) -> list[dict]:
    """Each onnxopt command of ``runs`` on ``model``, once per code version (a worktree first on PYTHONPATH).

    The model's files are read once first, and the versions take turns going first, row by row: the first run on a
    freshly written file paid a cold page cache (the 2 GiB sparse model: 9.6 s, then 3.7-4.7 s, ad hoc), which the
    version always run first was charged with."""
    warm_files(model.parent)
    rows: list[dict] = []
    for index, (label, args) in enumerate(runs):
        for version, tree in versions if index % 2 == 0 else versions[::-1]:
            out = model.parent / f"out_{len(rows)}.onnx"
            child_env = {**os.environ, **(env or {})}
            if tree is not None:
                child_env["PYTHONPATH"] = str(tree) + os.pathsep + child_env.get("PYTHONPATH", "")
            no_cache = ["--no-cache"] if args[0] == "optimize" else []  # the only command with a pass cache
            command = [sys.executable, "-m", "onnxopt", args[0], str(model), "-o", str(out), *data_args, *args[1:],
                       "--no-latency", *no_cache, "-q"]
            result = run(command, env=child_env, cwd=tree or REPO)
            if result["exit"] == 0 and out.exists():
                result.update(check_output(out))
            for leftover in model.parent.glob(f"{out.name}*"):  # outputs of 2 GB and more: one at a time on disk
                leftover.unlink()
            rows.append({"row": label, "code": version, **result})
            print(f"  {tag}: {label} [{version}]: {json.dumps(result)}", file=sys.stderr, flush=True)
    order = [version for version, _ in versions]
    return sorted(rows, key=lambda r: ([label for label, _ in runs].index(r["row"]), order.index(r["code"])))


def warm_files(folder: Path) -> None:
    """Read every file of ``folder`` once (into the page cache), so that no timed run is the first to read them."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def render(payload: dict) -> str:
    lines = ["# Models with external data: onnxopt normalize / quantize vs ORT quantize_static", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min ({payload['date']}). Do not edit "
             "by hand.", "", f"Host: {payload['host']}; load average before the run {payload['load_before']}, "
             f"after {payload['load_after']}.", "",
             "Models: MLPs with 4 x (MatMul + Add + Relu) of width W and a 10-class MatMul head, weights in one "
             "external file (`onnx.save(..., save_as_external_data=True)`, as torch's dynamo exporter writes them); "
             f"{SAMPLES} random calibration samples; above 2 GB ORT gets `use_external_data_format=True`. Last, a "
             "model whose one 1-D weight of 2 GiB of zeros lives in a sparse file, through `onnxopt optimize` (its "
             "default recipe). Each row is one subprocess (`--no-latency`; `optimize` with `--no-cache`: no pass "
             "result reused): wall time from start to exit (imports included), peak = its own VmHWM; a run is "
             f"killed once its resident memory passes {LIMIT_MB} MB. valid = the output passes the full ONNX checker "
             "and loads in ONNX Runtime; DQ = DequantizeLinear nodes in the output (0: the model stayed FP32). "
             "'before' rows run the code of the named git ref on the same files. The onnxopt command re-executes "
             "itself with malloc asking for transparent huge pages where the kernel gives them only on request "
             "(`onnxopt.hugepages`: " + payload.get("memory", "state not recorded") + "); code before that change "
             f"does not, and ORT's quantizer runs once as it is and once with `GLIBC_TUNABLES={HUGETLB}`.", ""]
    for case in payload["cases"]:
        lines += [f"## {case['title']}", "",
                  "| run | code | exit | wall | peak RSS | valid | DQ | output size | error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in case["rows"]:
            valid = "" if "valid" not in row else ("yes" if row["valid"] else f"no: {row['invalid']}")
            lines.append(f"| {row['row']} | {row['code']} | {row['exit']} | {row['seconds']:.1f} s | "
                         f"{row['peak_mb']} MB | {valid} | {row.get('dequantize_nodes', '')} | "
                         f"{row.get('size_mb', '')}{' MB' if 'size_mb' in row else ''} | "
                         f"{row.get('error', '').replace('|', '/')} |")
        lines.append("")
        lines += render_prepacking(case.get("prepacking"))
    return "\n".join(lines)


def render_prepacking(prepacking: dict | None) -> list[str]:
    if not prepacking:
        return []
    if "error" in prepacking:
        return [f"ORT weight prepacking: not measured ({prepacking['error']})", ""]
    lines = ["ORT weight prepacking (the FP32 model's session from its file, default threads; the faster of 2 "
             "creations, the median of 5 runs per session, each session's figure shown):", "",
             "| prepacking | session creation | run at batch 1 | run at batch 16 |", "|---|---|---|---|"]
    for key, label in (("on", "on (ORT's default)"), ("off", "off (`session.disable_prepacking`)")):
        record = prepacking[key]
        runs = ["/".join(f"{1000 * t:.1f}" for t in record[batch]) + " ms" for batch in ("batch 1", "batch 16")]
        lines.append(f"| {label} | {min(record['create']):.2f} s | {runs[0]} | {runs[1]} |")
    return lines + [""]


def _memory_state() -> str:
    """The kernel's THP mode, and whether the onnxopt command re-executes itself here (its own decision)."""
    from onnxopt import hugepages

    environ = {k: v for k, v in os.environ.items() if k not in (hugepages.ENV_SWITCH, "GLIBC_TUNABLES")}
    relaunches = hugepages.helps_here(environ)
    return (f"THP mode `{hugepages.thp_mode()}` on this host, so the command "
            + (f"re-executes itself with the tunable for models of {hugepages.RELAUNCH_FROM_BYTES / 2**30:g} GiB "
               "and more" if relaunches else "runs as it is"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "reports" / "large_model.md"))
    parser.add_argument("--widths", default="2048,4096,12288")
    parser.add_argument("--no-sparse", action="store_true", help="skip the 2 GiB sparse Gather model")
    parser.add_argument("--before", metavar="REF", help="also run the onnxopt rows with the code of this git ref")
    parser.add_argument("--ort-worker", nargs=3, metavar=("MODEL", "CALIB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--check-output", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--prepack-worker", nargs=2, metavar=("MODEL", "CALIB"), help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="JSON", help="rewrite --out from a previous run's JSON, measuring "
                                                         "nothing (the host's memory state read again)")
    args = parser.parse_args()
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        write_report(Path(args.out), {**payload, "memory": _memory_state()}, render)
        return
    if args.prepack_worker:
        prepack_worker(*args.prepack_worker)
        return
    if args.ort_worker:
        ort_worker(*args.ort_worker)
        return
    if args.check_output:
        print(json.dumps(check_output_here(Path(args.check_output))))
        return
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="onnxopt-large-") as tmp:
        workdir = Path(tmp)
        before = worktree(args.before, workdir / "before") if args.before else None
        try:
            versions = [("this commit", None)] + ([(f"before ({args.before})", before)] if before else [])
            cases = [measure(int(w), workdir, versions) for w in args.widths.split(",")]
            if not args.no_sparse:
                cases.append(measure_sparse(workdir, versions))
        finally:
            if before is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    command = "nice -n 5 python benchmarks/large_model.py" + (f" --before {args.before}" if args.before else "")
    command += (f" --widths {args.widths}" if args.widths != "2048,4096,12288" else "") + (
        " --no-sparse" if args.no_sparse else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": host_info().describe(),
               "load_before": load_before, "load_after": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
               "cases": cases, "memory": _memory_state()}
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
