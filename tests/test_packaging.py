"""What a release carries and how it is built: the sdist (the whole tracked project, so its tests
run from it), the wheel (the package, the Triton kernels as yoda_sparse.kernels, the C++/CUDA
sources as yoda_sparse/_csrc, the LICENSE; nothing else), the extension in it when built with
torch, stripped of debug info, and every imported package declared.

Cost: one ``python -m build --no-isolation`` (sdist, then a pure-Python wheel from it:
YODA_SPARSE_NO_EXT=1, ~25 s) and one wheel with the extension built from stub C++ sources
(CPU-only, ~30 s): compiling the real kernels into a wheel takes ~5 minutes here (measured:
4m42-5m08 on the 2-core machine), so whether the real sources compile is checked by the
project's set-up instead (scripts/setup_env.sh requires the extension; test_extension_build.py)
and the stripping on the extension that set-up built.
"""
import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from yoda_sparse.ops import extension

ROOT = Path(__file__).resolve().parents[1]
NAME = "yoda_sparse-0.1.0"
# what setuptools adds to an sdist
SDIST_METADATA = re.compile(r"^(PKG-INFO|setup\.cfg|yoda_sparse\.egg-info/.*)$")


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _python_m_build(src: Path, out: Path, *args, env=None) -> str:
    if importlib.util.find_spec("build") is None:
        pytest.fail("the `build` package is not installed (it is pinned in requirements-pinned.txt)")
    return _run([sys.executable, "-m", "build", "--no-isolation", *args, "-o", str(out), str(src)], cwd=src, env=env)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """sdist and, built from it as ``python -m build`` does, a pure-Python wheel."""
    out = tmp_path_factory.mktemp("dist")
    log = _python_m_build(ROOT, out, env={"YODA_SPARSE_NO_EXT": "1"})
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel, log


def _sdist_names(sdist: Path) -> set:
    with tarfile.open(sdist) as tar:
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}


def _project_files() -> "set | None":
    """Tracked and untracked-but-not-ignored files of the checkout, or None outside git."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    if listed.returncode != 0:
        return None
    return {f for f in listed.stdout.splitlines() if (ROOT / f).is_file()}


def test_build_is_clean(dists):
    """`python -m build --no-isolation` works without the `wheel` package and without
    setuptools deprecation or package-discovery warnings."""
    _, wheel, log = dists
    for bad in ("Deprecat", "deprecat", "is absent from the `packages` configuration", "Unmet dependencies"):
        assert bad not in log, f"{bad!r} in the build output:\n{log[-4000:]}"
    assert wheel.name == f"{NAME}-py3-none-any.whl"
    assert "yoda-sparse: YODA_SPARSE_NO_EXT set" in log


def test_sdist_is_the_whole_project(dists):
    sdist, _, _ = dists
    names = _sdist_names(sdist)
    for must in ["LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "tests/conftest.py",
                 "csrc/bindings.cpp", "kernels/yoda_step.py", "yoda_sparse/checkpoints/sr3_yoda_demo.safetensors",
                 "tests/fixtures/dino_vits8/dino_vits8_maps.safetensors"]:
        assert must in names, f"{must} is not in the sdist"
    assert not [n for n in names if n.endswith((".so", ".pyc", ".o")) or n.startswith((".venv/", "out/", "build/"))]
    files = _project_files()
    if files is None:
        pytest.skip("not a git checkout: the sdist is compared with the tracked files there")
    missing = sorted(files - names)
    extra = sorted(n for n in names - files if not SDIST_METADATA.match(n))
    assert not missing, f"tracked files missing from the sdist (add them to MANIFEST.in): {missing[:20]}"
    assert not extra, f"files in the sdist that git ignores or does not know: {extra[:20]}"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (Python >= 3.11)")
def test_sdist_tests_run_from_the_unpacked_sdist(dists, tmp_path):
    """Every test module imports there (its helpers, fixtures and conftest are shipped), and a
    test that reads the project's scripts passes."""
    sdist, _, _ = dists
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    src = tmp_path / NAME
    # -P: the installed yoda_sparse, not the unpacked copy (which has no compiled extension)
    pytest_cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(src)]
    env = {"YODA_SPARSE_NO_JIT": "1"}
    out = _run(pytest_cmd + ["--collect-only", "tests"], cwd=src, env=env, timeout=300)
    summary = out.strip().splitlines()[-1]  # "757 tests collected in 7.66s", or "..., 1 error ..."
    assert re.match(r"\d+ tests? collected in", summary) and "error" not in summary, out[-3000:]
    out = _run(pytest_cmd + ["tests/test_packaging.py::test_shell_scripts_parse"], cwd=src, env=env, timeout=300)
    assert "6 passed" in out, out[-2000:]


def _expected_wheel_files() -> set:
    files = _project_files()
    if files is None:
        pytest.skip("not a git checkout")
    want = set()
    for f in files:
        if f.startswith("yoda_sparse/"):
            want.add(f)
        elif f.startswith("kernels/") and f.endswith(".py"):
            want.add("yoda_sparse/" + f)
        elif f.startswith("csrc/"):
            want.add("yoda_sparse/_csrc/" + f[len("csrc/"):])
    return want


def test_wheel_holds_the_package_and_nothing_else(dists):
    _, wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{NAME}.dist-info/METADATA").decode()
    info = {n for n in names if n.startswith(f"{NAME}.dist-info/")}
    assert f"{NAME}.dist-info/licenses/LICENSE" in info
    assert (ROOT / "LICENSE").read_text().startswith("\n                                 Apache License\n")
    package = names - info
    assert not [n for n in package if not n.startswith("yoda_sparse/")], "files outside the package"
    assert not [n for n in package if n.endswith((".so", ".pyc")) or "/tests/" in n]
    assert package == _expected_wheel_files()
    for src in extension.SOURCES_CPU + extension.SOURCES_CUDA:
        assert f"yoda_sparse/_csrc/{src}" in package, f"{src} is not shipped"
    assert wheel.stat().st_size < 4_000_000, f"pure-Python wheel is {wheel.stat().st_size} bytes"
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    required = {re.split(r"[<>=!~; \[]", line.split(": ", 1)[1])[0].lower().replace("_", "-")
                for line in metadata.splitlines() if line.startswith("Requires-Dist: ") and "extra ==" not in line}
    assert {"torch", "torchvision", "timm", "huggingface-hub", "scipy", "numpy", "scikit-image"} <= required


_STUB = "// stand-in for the real kernels: the packaging test compiles only what it checks\nint yoda_stub_{n}() {{ return {n}; }}\n"


def test_wheel_built_with_torch_carries_the_stripped_extension(dists, tmp_path):
    """setup.py's real configuration, built from the sdist with torch importable: the wheel is
    platform-specific and holds yoda_sparse/_C without debug info.  The C++ sources are replaced
    by stubs and CUDA is off, so this takes seconds (see the module docstring)."""
    sdist, _, _ = dists
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    src = tmp_path / NAME
    for i, name in enumerate(extension.SOURCES_CPU):
        (src / "csrc" / name).write_text(_STUB.format(n=i))
    out = tmp_path / "dist"
    log = _python_m_build(src, out, "--wheel", env={"CUDA_HOME": str(tmp_path / "no-cuda"), "YODA_SPARSE_REQUIRE_EXT": "1"})
    assert "yoda-sparse: built yoda_sparse._C with CPU kernels" in log, log[-3000:]
    assert "-g0" in log and "-Wl,--strip-debug" in log
    (wheel,) = out.glob("*.whl")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.startswith(f"{NAME}-{tag}-{tag}-linux_"), wheel.name
    so = "yoda_sparse/_C" + sysconfig.get_config_var("EXT_SUFFIX")
    with zipfile.ZipFile(wheel) as zf:
        assert so in zf.namelist()
        assert b".debug_info" not in zf.read(so)
        assert not [n for n in zf.namelist() if "/tests/" in n or n.startswith(("tests/", ".venv", "out/"))]


def test_extension_from_the_set_up_has_no_debug_info():
    """The real extension, as scripts/setup_env.sh built it with setup.py's release flags
    (with debug info it was 16 MB, 3 MB without)."""
    spec = importlib.util.find_spec("yoda_sparse._C")
    if spec is None or spec.origin is None:
        pytest.skip("no prebuilt extension")
    data = Path(spec.origin).read_bytes()
    assert b".debug_info" not in data, f"{spec.origin} carries debug info ({len(data)} bytes)"
    assert len(data) < 8_000_000


def _load_setup_py():
    spec = importlib.util.spec_from_file_location("yoda_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs setup() only as __main__
    return module


def test_the_build_command_is_named_alike_at_install_and_at_first_use():
    assert _load_setup_py().BUILD_COMMAND == extension.BUILD_COMMAND


def test_an_install_without_the_extension_says_so_before_compiling_it(monkeypatch):
    """pip shows a successful build's output only with -v: an install built without torch
    says so itself, naming the command, before the minutes of a just-in-time build."""
    real_find_spec = importlib.util.find_spec
    real_import = extension.importlib.import_module

    def no_prebuilt(name, *args):
        if name == "yoda_sparse._C":
            raise ImportError("No module named 'yoda_sparse._C'")
        return real_import(name, *args)

    monkeypatch.setattr(extension.importlib.util, "find_spec",
                        lambda name, *a: None if name == "yoda_sparse._C" else real_find_spec(name, *a))
    monkeypatch.setattr(extension.importlib, "import_module", no_prebuilt)
    monkeypatch.setattr(extension, "_jit_build", lambda: "JIT build failed: (not run by this test)")
    monkeypatch.delenv(extension.NO_JIT_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match=r"no prebuilt yoda_sparse._C .* compiling the C\+\+ kernels just in time") as rec:
        reason = extension._load()
    assert extension.BUILD_COMMAND in str(rec[0].message) and extension.BUILD_COMMAND in reason
    monkeypatch.setenv(extension.NO_JIT_ENV, "1")
    reason = extension._load()
    assert extension.BUILD_COMMAND in reason and f"{extension.NO_JIT_ENV}=1" in reason


def test_torch_is_found_where_pip_installs_while_its_isolation_hides_it(tmp_path):
    """Under pip's build isolation (PYTHONPATH to the isolated tools, PYTHONNOUSERSITE) setup.py
    asks the interpreter pip runs for where its torch is, without those variables."""
    import torch

    torch_site_of = _load_setup_py().torch_site_of
    site = str(Path(torch.__file__).resolve().parents[1])
    hidden = {"PYTHONPATH": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    saved = {k: os.environ.get(k) for k in hidden}
    os.environ.update(hidden)
    try:
        assert str(Path(torch_site_of([sys.executable])).resolve()) == site
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert torch_site_of([sys.executable, "-S"]) is None  # an interpreter without torch
    assert torch_site_of([str(tmp_path / "no-python")]) is None


# ---------------------------------------------------------------------------------------------
# Every imported package is declared
# ---------------------------------------------------------------------------------------------

# imported, but not a dependency of its own: (module, why)
NOT_DEPENDENCIES = {"nvidia": "the CUDA wheels' namespace that torch brings, read for headers at build time (guarded)"}
# third-party imports that an optional extra may make unguarded, where the module is itself optional
OPTIONAL_MODULES = {"triton": ("kernels/",)}  # yoda_sparse imports the Triton kernels only when triton imports


def _declared() -> "tuple[set, set]":
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~; \[]", r)[0].lower().replace("_", "-") for r in reqs}

    extras = set()
    for reqs in project["optional-dependencies"].values():
        extras |= names(reqs)
    return names(project["dependencies"]), extras


def _guarded(node, parents) -> bool:
    """Inside a try that catches ImportError (or broader), or an if on find_spec(...)."""
    for p in parents.get(node, ()):
        if isinstance(p, ast.Try) and any(
            h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
                                  for n in ast.walk(h.type)) for h in p.handlers):
            return True
        if isinstance(p, ast.If) and "find_spec" in ast.unparse(p.test):
            return True
    return False


def _imports(path: Path):
    """(top-level module, guarded, line) of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {}

    def walk(node, chain):
        # a try or an if guards the statements of its body only (not handlers, else, finally)
        guarded_body = {id(n) for n in node.body} if isinstance(node, (ast.Try, ast.If)) else set()
        for child in ast.iter_child_nodes(node):
            inner = chain + (node,) if id(child) in guarded_body else chain
            parents[child] = inner
            walk(child, inner)

    walk(tree, ())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        for m in mods:
            yield m.split(".")[0], _guarded(node, parents), node.lineno


def test_every_imported_package_is_declared():
    core, extras = _declared()
    dist_of = importlib.metadata.packages_distributions()
    local = {"yoda_sparse", "kernels"} | {p.stem for p in (ROOT / "kernels").glob("*.py")}
    problems = []
    for folder in ("yoda_sparse", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for mod, guarded, line in _imports(path):
                if mod in sys.stdlib_module_names or mod in local or mod in NOT_DEPENDENCIES or mod == "__future__":
                    continue
                dists = {d.lower().replace("_", "-") for d in dist_of.get(mod, [mod])}
                where = f"{rel}:{line} imports {mod}"
                if dists & core:
                    continue
                if not dists & extras:
                    problems.append(f"{where}, which pyproject.toml does not declare ({sorted(dists)})")
                elif not guarded and not rel.startswith(OPTIONAL_MODULES.get(mod, ("-",))):
                    problems.append(f"{where} unguarded, but {sorted(dists)} is only an optional extra")
    assert not problems, "\n".join(problems)


def test_installed_sources_are_found_and_never_stale(tmp_path, monkeypatch):
    """Outside a checkout the JIT build reads the shipped copy, and the prebuilt module is not
    judged stale against it (its files are as old as the install)."""
    pkg = tmp_path / "site" / "yoda_sparse"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "_csrc").mkdir()
    (pkg / "_csrc" / "bindings.cpp").write_text("// shipped\n")
    monkeypatch.setattr(extension, "__file__", str(pkg / "ops" / "extension.py"))
    assert extension.checkout_csrc_dir() is None
    assert extension.csrc_dir() == pkg / "_csrc"
    assert extension._stale_prebuilt() is None


def test_checkout_sources_come_first():
    if extension.checkout_csrc_dir() is None:
        pytest.skip("not a source checkout")
    assert extension.csrc_dir() == ROOT / "csrc"


# A compiler that links its own static libstdc++ into the extension gives it a second C++ runtime
# next to torch's (seen on a GPU image: every TORCH_CHECK on bad input then crashed the process).
def _gxx():
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    return gxx


def test_a_shared_cxx_runtime_needs_no_extra_link_flags():
    gxx = _gxx()
    assert not extension._links_libstdcxx_statically(gxx)
    assert extension.link_flags(gxx) == extension.LD_FLAGS


def test_a_static_cxx_runtime_is_replaced_by_torchs(tmp_path):
    gxx = _gxx()
    static_archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(static_archive):
        pytest.skip("g++ has no static libstdc++ to link")
    wrapper = tmp_path / "g++-static-runtime"
    wrapper.write_text(f'#!/bin/sh\nexec "{gxx}" -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert extension._links_libstdcxx_statically(str(wrapper))
    flags = extension.link_flags(str(wrapper))
    runtime = extension._loaded_libstdcxx()
    assert runtime is not None and flags == extension.LD_FLAGS + [runtime]
    # with those flags the same compiler links the shared runtime after all
    src, lib = tmp_path / "probe.cpp", tmp_path / "probe.so"
    src.write_text('#include <stdexcept>\nvoid probe() { throw std::runtime_error("x"); }\n')
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(src), "-o", str(lib), runtime], check=True)
    assert b"libstdc++.so" in lib.read_bytes()


def test_prebuilt_extension_uses_a_shared_cxx_runtime():
    spec = importlib.util.find_spec("yoda_sparse._C")
    if spec is None or spec.origin is None:
        pytest.skip("no prebuilt extension")
    assert b"libstdc++.so" in Path(spec.origin).read_bytes(), f"{spec.origin} carries its own static libstdc++"


@pytest.mark.parametrize(
    "script", ["run.sh", "test.sh", ".ci/run", "scripts/setup_env.sh", "scripts/test_torch.sh", "benchmarks/gpu_check.sh"]
)
def test_shell_scripts_parse(script):
    """Most of these only run on a fresh clone, in CI or on a GPU machine: a syntax error
    there would show up late and cost a run."""
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_host_path_profiler_runs_on_cpu():
    """benchmarks/profile_host_path.py, with the C++ backend where built (else the reference)."""
    backend = "cpp" if extension.load() is None else "reference"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_host_path.py"), "--device", "cpu", "--backend", backend,
         "--calls", "2", "--top", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    timed = [line for line in proc.stdout.splitlines() if line.endswith("µs/call")]
    assert len(timed) == 6 and all(float(line.split()[-2]) > 0 for line in timed), proc.stdout[:2000]
    assert proc.stdout.count(f"{backend}, by tottime") == 2, proc.stdout[-2000:]


def test_sparse_layer_profiler_runs_on_cpu():
    """benchmarks/profile_sparse_layers.py on a small model: a row per step, the per-level
    table, and its total over the layers that ran sparse."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_sparse_layers.py"), "--model", "sr3_tiny", "--size", "64",
         "--steps", "4", "--source", "disk:0.4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    first = lines.index(next(ln for ln in lines if ln.startswith("| step |"))) + 2
    steps = lines[first:lines.index("", first)]
    assert [ln.split("|")[1].strip() for ln in steps] == ["0", "1", "2", "3"], proc.stdout[-2000:]
    total = [ln for ln in lines if ln.startswith("| all |")]
    assert len(total) == 1 and float(total[0].split("|")[3]) > 0, proc.stdout[-2000:]
