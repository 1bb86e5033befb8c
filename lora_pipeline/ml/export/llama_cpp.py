"""llama.cpp itself, from the pinned llama-cpp-python source distribution: its converter scripts, and its
own tokenizer and quantizer built as binaries. Dagster-free.

Nothing of llama.cpp is copied into this repository. The sdist (which vendors a whole llama.cpp tree)
is downloaded once with pip into a cache folder; the converter scripts are extracted from it as they
are, and `llama-tokenize` and `llama-quantize` are built from its C++ sources with cmake (CPU only,
Release, only those two targets), once per cache. `llama-tokenize` is what proves an export: the
tokens llama.cpp and Ollama feed the model for a text are read from llama.cpp's own code, not from a
re-implementation of it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

# The llama-cpp-python sdist the converter scripts and binaries come from (tested with its output).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# What the converter scripts need from the sdist's vendored llama.cpp tree.
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
# What cmake needs to build the tools: the libraries and tools/, without the server's web UI (8 MB
# of TypeScript); models/, docs/, tests/ and examples/ (120 MB) are not extracted.
_SOURCE_PARTS = ("CMakeLists.txt", "cmake/", "common/", "ggml/", "include/", "src/", "vendor/", "licenses/",
                 "LICENSE", "tools/")
_SOURCE_SKIP = ("tools/ui/",)
# The binaries built, each its own cmake target of the same name.
TOOLS = ("llama-tokenize", "llama-quantize")
# CPU only and static (the binaries are moved into the cache alone, so they must not need the build
# folder's shared libraries); GGML_NATIVE off so a cache shared across machines never holds code for
# one CPU's extensions; no OpenMP, OpenSSL or ccache, which the two tools never need and a bare
# machine may not have.
_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF",
    "-DGGML_CCACHE=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
)


def default_cache() -> Path:
    """Where llama.cpp's scripts and binaries are cached: $LORA_PIPELINE_LLAMA_CPP_CACHE, else the user's
    cache folder (shared by every checkout and run; a cache, so deleting it only costs a download and a build)."""
    if os.environ.get("LORA_PIPELINE_LLAMA_CPP_CACHE"):
        return Path(os.environ["LORA_PIPELINE_LLAMA_CPP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-pipeline" / "llama-cpp"


def _sdist(cache: Path, version: str) -> Path:
    """The pinned llama-cpp-python source distribution, downloaded into the cache on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        # pip is the ordinary client of the package index (and honours the user's index settings).
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
             "--no-binary", ":all:", "-d", str(cache)],
            check=True, capture_output=True, text=True,
        )
    return archive


def _extract(archive: Path, version: str, parts: tuple[str, ...], staging: Path,
             skip: tuple[str, ...] = ()) -> Path:
    """Extract the parts of the sdist's vendored llama.cpp tree into staging; returns the tree's folder there."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())
                   and any(m.name[len(prefix):].startswith(part) for part in parts)
                   and not any(m.name[len(prefix):].startswith(part) for part in skip)]
        tar.extractall(staging, members=members, filter="data")
    return staging / prefix


def converter_dir(cache: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The folder holding llama.cpp's converter scripts, fetching the pinned sdist on first use."""
    target = cache / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    archive = _sdist(cache, version)
    staging = cache / f".staging-{os.getpid()}"
    try:
        tree = _extract(archive, version, _CONVERTER_PARTS, staging)
        # Atomic rename, so a half-extracted folder is never taken for a complete one.
        if not target.exists():
            tree.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def converter_architectures(cache: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> frozenset[str]:
    """The Hugging Face architectures (config.json's `architectures`) the pinned convert_hf_to_gguf.py converts as
    text models: the keys of its conversion package's TEXT_MODEL_MAP, read from the source as written (importing
    the package would import torch and every model module) so an export can refuse before it starts."""
    import ast

    source = converter_dir(cache, version) / "conversion" / "__init__.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    raise RuntimeError(f"{source}: no TEXT_MODEL_MAP; the converter's layout is not the one this code was written for")


def converter_tensor_name_map(cache: Path, architecture: str, blocks: int, version: str = LLAMA_CPP_PYTHON_VERSION):
    """The tensor name map (HF name -> GGUF name) of the converter's own gguf-py for a GGUF architecture
    (general.architecture, e.g. 'qwen3'), the one that named the tensors of a file it wrote.

    The converter scripts run with their own gguf-py, which knows more names than the pinned `gguf` package;
    only its constants and tensor_mapping modules are loaded, as a package of their own (so the installed
    `gguf` is left as it is and nothing else of gguf-py is imported). None when it has no such architecture."""
    import importlib
    import importlib.machinery
    import importlib.util

    package = "_lora_pipeline_llama_cpp_gguf_" + version.replace(".", "_")
    if package not in sys.modules:
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(package, None, is_package=True))
        module.__path__ = [str(converter_dir(cache, version) / "gguf-py" / "gguf")]
        sys.modules[package] = module
    constants = importlib.import_module(f"{package}.constants")
    mapping = importlib.import_module(f"{package}.tensor_mapping")
    arch = next((key for key, name in constants.MODEL_ARCH_NAMES.items() if name == architecture), None)
    return None if arch is None else mapping.get_tensor_name_map(arch, blocks)


def _ensure_build_tools() -> None:
    """cmake and a C++ compiler on PATH: installed with apt-get when missing and running as root on Debian,
    else an error saying what to install."""
    missing = [tool for tool in ("cmake", "c++", "make") if shutil.which(tool) is None]
    if not missing:
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        logger.info("installing %s with apt-get to build llama.cpp's tools", ", ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "cmake", "build-essential"],
                       check=True, capture_output=True, env=env)
        return
    raise RuntimeError(f"building llama.cpp's tools needs {', '.join(missing)}: install cmake and a C++ compiler "
                       "(Debian: apt-get install cmake build-essential)")


def tools_dir(cache: Path, version: str = LLAMA_CPP_PYTHON_VERSION, progress=logger.info) -> Path:
    """The folder holding llama.cpp's llama-tokenize and llama-quantize, built on first use.

    They are built from the sources vendored in the same pinned sdist as the converter scripts, so the
    tokenizer that checks an export is the llama.cpp those scripts were written for. The build (a few
    minutes on two cores) happens once per cache; a failed or interrupted one leaves nothing behind."""
    target = cache / f"llama.cpp-{version}-bin"
    if all(os.access(target / tool, os.X_OK) for tool in TOOLS):
        return target
    _ensure_build_tools()
    archive = _sdist(cache, version)
    staging = cache / f".build-{os.getpid()}"
    started = time.perf_counter()
    try:
        source = _extract(archive, version, _SOURCE_PARTS, staging, skip=_SOURCE_SKIP)
        build = staging / "build"
        progress(f"building llama.cpp's {' and '.join(TOOLS)} (once per cache) in {build}")
        for command in (
            ["cmake", "-S", str(source), "-B", str(build), *_CMAKE_OPTIONS],
            ["cmake", "--build", str(build), "--config", "Release", "--parallel", str(os.cpu_count() or 1),
             "--target", *TOOLS],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building llama.cpp's tools failed: {' '.join(command[:2])} exited "
                                   f"{done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
        binaries = staging / "bin"
        binaries.mkdir()
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, binaries / tool)
        # Atomic rename, so a half-built folder is never taken for a complete one.
        if not target.exists():
            binaries.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"built llama.cpp's tools into {target} in {time.perf_counter() - started:.0f}s")
    return target


def llama_quantize(cache: Path) -> Path:
    """The llama-quantize binary built from the pinned llama.cpp (building it on first use)."""
    return tools_dir(cache) / "llama-quantize"


def _tokenize_one(binary: Path, gguf_file: Path, text: str) -> list[int]:
    # --stdin: the text's bytes as they are (a prompt on the command line cannot hold a NUL and is
    # limited in length); --no-escape: a backslash in the text is a backslash, not the start of '\n';
    # special tokens are parsed, as llama.cpp's server and CLI do with a rendered prompt.
    done = subprocess.run([str(binary), "-m", str(gguf_file), "--stdin", "--ids", "--no-escape", "--log-disable"],
                          input=text.encode("utf-8"), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-tokenize failed on {gguf_file.name} (exit {done.returncode}):\n"
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    # --ids prints one Python-style list on the last line of stdout.
    line = done.stdout.decode().strip().splitlines()[-1]
    return [int(token) for token in line.strip("[]").split(",") if token.strip()]


def llama_cpp_token_ids(gguf_file: Path, texts: list[str], cache: Path) -> list[list[int]]:
    """The token ids llama.cpp gives each text with the GGUF's vocabulary, as its server and CLI do: its
    own BOS/EOS rule (tokenizer.ggml.add_bos_token / add_eos_token) and special tokens parsed.

    llama-tokenize takes one text a run (it has no batch mode), so the texts run in parallel, one
    process each; it loads only the vocabulary, a few milliseconds for a 150k-token one."""
    binary = tools_dir(cache) / "llama-tokenize"
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda text: _tokenize_one(binary, gguf_file, text), texts))
