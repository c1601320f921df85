"""Where ONNX Runtime's CUDA execution provider places every node of a graph, measured on a machine without a GPU.

    python -m benchmarks.cuda_placement --home DIR MODEL.onnx [MODEL2.onnx ...]

`--home DIR` holds the real CUDA provider of the onnxruntime-gpu wheel (ORT_GPU_VERSION, downloaded once from the
package index and unpacked there) and a stub for every CUDA library it links against: each symbol returns success,
and the few whose outputs the provider reads while a session is created (device count, versions, free memory,
allocations, handles) fill them in. Over those stubs ONNX Runtime creates real sessions: it partitions the graph,
inserts its copies and builds its kernels, and computes nothing (a run would be garbage). For each model, in a child
process (the stubs must be on LD_LIBRARY_PATH before the provider loads): nodes per provider, the ops without a CUDA
kernel and the Memcpy nodes (moe_core/runtime/ort_session.py session_with_placement, the reader `moe serve` uses), and
whether a session with CUDA graph capture (`enable_cuda_graph=1`) is accepted, which ONNX Runtime refuses for a
graph with any compute node off CUDA or any copy. Exit 1 if any model fails one of those.

What it cannot see: numerics, speed, and a kernel that refuses a shape or an attribute only when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ORT_GPU_VERSION = "1.31.1"  # the newest onnxruntime-gpu on the package index (CUDA 13, cuDNN 9)
PROVIDER_LIB = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
SYSTEM_LIB = re.compile(r"^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^.]*)\.so")

# The stubs that must do more than return 0 (cudaSuccess): what the provider reads back while creating a session.
STUB_BODIES = {
    "cudaGetDeviceCount": "int cudaGetDeviceCount(int *n) { if (n) *n = 1; return 0; }",
    "cudaGetDevice": "int cudaGetDevice(int *d) { if (d) *d = 0; return 0; }",
    "cudaRuntimeGetVersion": "int cudaRuntimeGetVersion(int *v) { if (v) *v = 13000; return 0; }",
    "cudaDriverGetVersion": "int cudaDriverGetVersion(int *v) { if (v) *v = 13000; return 0; }",
    "cudaDeviceGetAttribute": "int cudaDeviceGetAttribute(int *v, int attr, int dev) { if (v) *v = 0; return 0; }",
    "cudaMemGetInfo": "int cudaMemGetInfo(size_t *f, size_t *t) { size_t g = (size_t)80 << 30; if (f) *f = g; "
                      "if (t) *t = g; return 0; }",
    "cudaGetErrorString": 'const char *cudaGetErrorString(int e) { return "stub"; }',
    "cudaGetErrorName": 'const char *cudaGetErrorName(int e) { return "stub"; }',
    "cublasGetStatusString": 'const char *cublasGetStatusString(int e) { return "stub"; }',
    "cublasGetStatusName": 'const char *cublasGetStatusName(int e) { return "stub"; }',
    "__cudaRegisterFatBinary": "static void *fatbin[4]; void **__cudaRegisterFatBinary(void *f) { return fatbin; }",
    "__cudaUnregisterFatBinary": "void __cudaUnregisterFatBinary(void **h) {}",
    "__cudaRegisterFatBinaryEnd": "void __cudaRegisterFatBinaryEnd(void **h) {}",
    "__cudaRegisterFunction": "void __cudaRegisterFunction(void) {}",
    "__cudaRegisterVar": "void __cudaRegisterVar(void) {}",
    "cudaMalloc": "int cudaMalloc(void **p, size_t n) { if (p) *p = malloc(n ? n : 1); return 0; }",
    "cudaMallocHost": "int cudaMallocHost(void **p, size_t n) { if (p) *p = malloc(n ? n : 1); return 0; }",
    "cudaHostAlloc": "int cudaHostAlloc(void **p, size_t n, unsigned f) { if (p) *p = malloc(n ? n : 1); return 0; }",
    "cudaStreamCreate": "int cudaStreamCreate(void **s) { if (s) *s = 0; return 0; }",
    "cudaStreamCreateWithFlags": "int cudaStreamCreateWithFlags(void **s, unsigned f) { if (s) *s = 0; return 0; }",
    "cudaEventCreate": "int cudaEventCreate(void **e) { if (e) *e = 0; return 0; }",
    "cudaEventCreateWithFlags": "int cudaEventCreateWithFlags(void **e, unsigned f) { if (e) *e = 0; return 0; }",
    "cublasCreate_v2": "static int cublas; int cublasCreate_v2(void **h) { if (h) *h = &cublas; return 0; }",
    "cublasLtCreate": "static int cublaslt; int cublasLtCreate(void **h) { if (h) *h = &cublaslt; return 0; }",
    "cudaStreamIsCapturing": "int cudaStreamIsCapturing(void *s, int *st) { if (st) *st = 0; return 0; }",
    "cudaGetDriverEntryPointByVersion": "int cudaGetDriverEntryPointByVersion(const char *n, void **fn, unsigned v, "
                                        "unsigned long long fl, int *st) { if (fn) *fn = 0; if (st) *st = 1; "
                                        "return 0; }",
}

# Runs in the child: the unpacked wheel's onnxruntime first on sys.path, then this repository.
CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from benchmarks.cuda_placement import placement_row
from moe_core.runtime.ort_session import CPU_EP, CUDA_EP
for model in sys.argv[3:]:
    print(json.dumps(placement_row(model, [(CUDA_EP, {"use_tf32": "0"}), CPU_EP])), flush=True)
"""


def placement_row(model: str | os.PathLike, providers: list, threads: int | None = 1) -> dict:
    """Where the onnxruntime this process imported places `model` on `providers` (moe_core/runtime/ort_session.py
    session_with_placement): providers, nodes per provider, no_cuda_kernel, memcpy (or error); and when the first
    provider is CUDA, cuda_graph: whether a session with CUDA graph capture is accepted. What `failures` reads."""
    from moe_core.runtime.ort_session import CPU_EP, CUDA_EP, captured_stderr, ort_session, session_with_placement

    row: dict = {"model": str(model)}
    try:
        session, placement = session_with_placement(model, threads, providers)
        row.update(providers=session.get_providers(), nodes=placement.nodes,
                   no_cuda_kernel=placement.no_cuda_kernel, memcpy=placement.memcpy)
    except Exception as e:  # ONNX Runtime's own exception types
        row["error"] = str(e).splitlines()[0][:300]
    first = providers[0]
    if isinstance(first, tuple) and first[0] == CUDA_EP:
        try:
            with captured_stderr():
                ort_session(model, threads, [(CUDA_EP, {**first[1], "enable_cuda_graph": "1"}), CPU_EP])
            row["cuda_graph"] = "accepted"
        except Exception as e:
            row["cuda_graph"] = "refused: " + " ".join(str(e).split())[:300]
    return row


def setup(home: str | os.PathLike, version: str = ORT_GPU_VERSION) -> Path:
    """The folder with the unpacked onnxruntime-gpu `version` (home/ort) and its stub CUDA libraries (home/stubs),
    made once (home/.ready marks it done). The wheel comes from the package index through this interpreter's pip,
    so its Python tag matches the interpreter that will load it."""
    home = Path(home) / f"ort-gpu-{version}"
    if (home / ".ready").exists():
        return home
    (home / "stubs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", tmp, f"onnxruntime-gpu=={version}"], check=True)
        wheel = next(Path(tmp).glob("onnxruntime_gpu-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(home / "ort")
    build_stubs(home / "ort" / PROVIDER_LIB, home / "stubs")
    (home / ".ready").touch()
    return home


def build_stubs(provider: Path, out: Path) -> None:
    """A shared library for every non-system library `provider` needs, defining every symbol it imports from it (with
    the library's version node where the provider asks for sym@LIB)."""
    needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", tool("readelf", "-d", provider))
    libs = [n for n in needed if not SYSTEM_LIB.match(n)]
    symbols: dict[str, set[str]] = {lib: set() for lib in libs}
    versioned: set[str] = set()
    driver = next((lib for lib in libs if lib.startswith("libcuda.")), "libcuda.so.1")
    for line in tool("nm", "-D", "--undefined-only", provider).splitlines():
        name = line.split()[-1]
        symbol, _, lib = name.partition("@")
        lib = lib.lstrip("@")
        if lib in symbols:
            symbols[lib].add(symbol)
            versioned.add(lib)
        elif not lib and name.startswith("cu") and not name.startswith(("cuda", "cublas", "curand")):
            symbols.setdefault(driver, set()).add(name)  # the driver API, resolved without a version
    for lib, names in symbols.items():
        source = out / f"{lib}.c"
        lines = ["#include <stdlib.h>", "#include <stddef.h>", "int moe_placement_stub(void) { return 0; }"]
        lines += [STUB_BODIES.get(n, f"int {n}(void) {{ return 0; }}") for n in sorted(names)]
        source.write_text("\n".join(lines) + "\n")
        args = ["gcc", "-shared", "-fPIC", "-o", str(out / lib), str(source), f"-Wl,-soname,{lib}"]
        if lib in versioned:
            script = out / f"{lib}.map"
            script.write_text(f"{lib} {{ global: *; }};\n")
            args.append(f"-Wl,--version-script={script}")
        subprocess.run(args, check=True)


def tool(*args: str | os.PathLike) -> str:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True).stdout


def place(models: list[str | os.PathLike], home: str | os.PathLike) -> list[dict]:
    """One row per model (CHILD): providers, nodes per provider, no_cuda_kernel, memcpy, cuda_graph, or error."""
    home = Path(home)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(home / "stubs"),
                                                                          os.environ.get("LD_LIBRARY_PATH")])))
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", CHILD, str(home / "ort"), str(repo), *map(str, models)], env=env,
                       capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or len(rows) != len(models):
        raise RuntimeError(f"placement child failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return rows


def failures(row: dict) -> list[str]:
    """What keeps a model from running entirely on CUDA (placement_row's row; one placed for the CPU provider alone
    is only checked for copies): [] when it does."""
    if "error" in row:
        return [f"no session: {row['error']}"]
    out = []
    cuda = "cuda_graph" in row  # CUDA was asked for
    if cuda and row["providers"][:1] != ["CUDAExecutionProvider"]:
        out.append(f"CUDA provider not loaded (session providers {row['providers']})")
    if row["no_cuda_kernel"]:
        out.append(f"no CUDA kernel: {row['no_cuda_kernel']}")
    if row["memcpy"]:
        out.append(f"{row['memcpy']} Memcpy nodes")
    if cuda and row["cuda_graph"] != "accepted":
        out.append(f"CUDA graph {row['cuda_graph']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, help="where the onnxruntime-gpu wheel and the stubs live (made once)")
    ap.add_argument("--version", default=ORT_GPU_VERSION, help="the onnxruntime-gpu version")
    ap.add_argument("--json", action="store_true", help="one JSON object per model")
    ap.add_argument("models", nargs="*", help="ONNX files (none: only set the folder up)")
    a = ap.parse_args()
    home = setup(a.home, a.version)
    if not a.models:
        print(home)
        return 0
    bad = 0
    for row in place(a.models, home):
        problems = failures(row)
        bad += bool(problems)
        if a.json:
            print(json.dumps({**row, "ok": not problems}))
            continue
        nodes = ", ".join(f"{ep.removesuffix('ExecutionProvider')} {n}" for ep, n in row.get("nodes", {}).items())
        print(f"{row['model']}: nodes {nodes or '-'} | Memcpy {row.get('memcpy', '-')} | "
              f"CUDA graph {row['cuda_graph']} | " + ("; ".join(problems) if problems else "all on CUDA"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
