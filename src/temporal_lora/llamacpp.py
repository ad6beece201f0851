"""A small in-process wrapper over llama.cpp's C API (the optional `cpu-engine` extra).

The bindings come from PyPI `llama-cpp-py-sync` (CFFI ABI mode over the public `llama.h`, prebuilt
CPU libraries, no compiler needed). Only what the batching engine needs is wrapped: load a GGUF
model and GGUF LoRA adapters, one context with one KV sequence per request, set the context's
adapter->scale set, decode a batch, read logits. Tokenizing and sampling stay ours.

That wheel is tagged manylinux2014 but its libraries were linked against glibc 2.38 (the C23
`__isoc23_strtol` family). On an older glibc we load a patched copy from the cache instead: those
few imports are pointed at the classic functions of the same name (identical for the decimal
numbers llama.cpp parses), nothing else changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np

from temporal_lora.cache import cache_dir
from temporal_lora.errors import TemporalLoRAError

PACKAGE = "llama_cpp_py_sync"
EXTRA_HINT = "pip install 'temporal-lora[cpu-engine]'"

_state: dict = {}
_state_lock = threading.Lock()


class LlamaCppError(TemporalLoRAError):
    """llama.cpp is missing, cannot load a file, or failed to decode."""


def missing_reason() -> str | None:
    """None if llama.cpp can be loaded here, else a one-line reason (for skips and --engine auto)."""
    try:
        _library()
    except LlamaCppError as exc:
        return str(exc)
    return None


def _library():
    """(ffi, lib), loaded once; llama.cpp's log output is silenced."""
    with _state_lock:
        if "lib" in _state:
            return _state["ffi"], _state["lib"]
        try:
            from llama_cpp_py_sync import _cffi_bindings as bindings
        except ImportError as exc:
            raise LlamaCppError(f"llama.cpp is not installed ({EXTRA_HINT})") from exc
        ffi = bindings.ffi
        folder = Path(bindings.__file__).parent
        try:
            lib = ffi.dlopen(str(folder / "libllama.so"))
        except OSError as exc:
            if "GLIBC_2.38" not in str(exc):
                raise LlamaCppError(f"cannot load llama.cpp: {str(exc).splitlines()[0]}") from exc
            try:
                lib = ffi.dlopen(str(_patched_copy(folder) / "libllama.so"))
            except (OSError, ValueError) as exc2:
                raise LlamaCppError(f"cannot load llama.cpp: {str(exc2).splitlines()[0]}") from exc2

        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def quiet(level, text, user_data):  # noqa: ARG001
            return None

        lib.llama_log_set(quiet, ffi.NULL)
        lib.llama_backend_init()
        _state.update(ffi=ffi, lib=lib, log=quiet)
        return ffi, lib


def _patched_copy(folder: Path) -> Path:
    """The wheel's libraries with their glibc-2.38-only imports repointed (see the module docstring)."""
    files = sorted(p for p in folder.iterdir() if p.name.startswith("lib") and ".so" in p.name)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    target = cache_dir() / "llamacpp" / digest.hexdigest()[:16]
    if (target / "libllama.so").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".patch-"))
    try:
        for path in files:
            shutil.copy2(path, tmp / path.name)
            _repoint_c23_imports(tmp / path.name)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "libllama.so").is_file():
            raise
        # else another process finished the same copy first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _repoint_c23_imports(path: Path) -> None:
    """In one ELF64 shared library: every `__isoc23_X@GLIBC_2.38` import becomes `X@GLIBC_2.2.5`
    (the name string's tail, the older version index), and GLIBC_2.38 becomes a weak requirement."""
    data = bytearray(path.read_bytes())
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    kinds = {s[1]: s for s in sections}
    dynsym, versym, verneed = kinds.get(11), kinds.get(0x6FFFFFFF), kinds.get(0x6FFFFFFE)
    if not (dynsym and versym and verneed):
        return
    strtab = sections[dynsym[6]][4]

    def name_at(offset: int) -> str:
        start = strtab + offset
        return data[start:data.index(0, start)].decode()

    versions: dict[str, tuple[int, int]] = {}  # libc version name -> (index, offset of its entry)
    entry = verneed[4]
    for _ in range(verneed[7]):
        _, count, file, aux, following = struct.unpack_from("<HHIII", data, entry)
        at = entry + aux
        for _ in range(count):
            _, _, index, vname, step = struct.unpack_from("<IHHII", data, at)
            if name_at(file) == "libc.so.6":
                versions[name_at(vname)] = (index, at)
            at += step
        if not following:
            break
        entry += following
    if "GLIBC_2.38" not in versions:
        return
    new_index, old_index = versions["GLIBC_2.2.5"][0], versions["GLIBC_2.38"][0]
    prefix = "__isoc23_"
    for i in range(dynsym[5] // 24):
        if struct.unpack_from("<H", data, versym[4] + 2 * i)[0] & 0x7FFF != old_index:
            continue
        st_name = struct.unpack_from("<I", data, dynsym[4] + 24 * i)[0]
        if not name_at(st_name).startswith(prefix):
            raise ValueError(f"{path.name} needs {name_at(st_name)} from glibc 2.38")
        struct.pack_into("<I", data, dynsym[4] + 24 * i, st_name + len(prefix))
        struct.pack_into("<H", data, versym[4] + 2 * i, new_index)
    flags_at = versions["GLIBC_2.38"][1] + 4
    struct.pack_into("<H", data, flags_at, struct.unpack_from("<H", data, flags_at)[0] | 2)  # VER_FLG_WEAK
    path.write_bytes(data)


class LlamaModel:
    """A GGUF model loaded on the CPU, and GGUF LoRA adapters loaded onto it."""

    def __init__(self, path: str | Path):
        self.ffi, self.lib = _library()
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.path = str(path)
        self.ptr = self.lib.llama_model_load_from_file(self.path.encode(), params)
        if self.ptr == self.ffi.NULL:
            raise LlamaCppError(f"llama.cpp cannot load the model {path}")
        self.n_vocab = int(self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.ptr)))
        self.adapters: dict[str, object] = {}

    def lora(self, path: str | Path):
        """The loaded adapter of this GGUF LoRA file (loaded once)."""
        key = str(path)
        if key not in self.adapters:
            handle = self.lib.llama_adapter_lora_init(self.ptr, key.encode())
            if handle == self.ffi.NULL:
                raise LlamaCppError(f"llama.cpp cannot load the LoRA {path} onto {self.path}")
            self.adapters[key] = handle
        return self.adapters[key]

    def close(self) -> None:
        if self.ptr is not None:
            for handle in self.adapters.values():
                self.lib.llama_adapter_lora_free(handle)
            self.adapters.clear()
            self.lib.llama_model_free(self.ptr)
            self.ptr = None


class LlamaContext:
    """One llama.cpp context: `n_seq` KV sequences sized for `n_ctx_seq` tokens each, one adapter set
    at a time. Sequences are independent; only the adapters of the decode call apply to it.

    `unified`: the sequences share one KV buffer of n_seq x n_ctx_seq cells (a decode of many
    sequences is one attention over it, masked per sequence) instead of one buffer each; the caller
    keeps each sequence within n_ctx_seq."""

    def __init__(self, model: LlamaModel, *, n_seq: int = 1, n_ctx_seq: int = 2048, n_threads: int = 1,
                 n_batch: int = 512, kv_f32: bool = True, unified: bool = True):
        self.model, self.ffi, self.lib = model, model.ffi, model.lib
        p = self.lib.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_seq
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = n_threads
        p.kv_unified = unified
        p.no_perf = True
        if kv_f32:  # the exact path keeps K and V in float32, as the torch engine does
            p.type_k = p.type_v = self.lib.GGML_TYPE_F32
            p.flash_attn_type = self.lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ptr = self.lib.llama_init_from_model(model.ptr, p)
        if self.ptr == self.ffi.NULL:
            raise LlamaCppError("llama.cpp could not create a context (out of memory?)")
        self.memory = self.lib.llama_get_memory(self.ptr)
        self.n_seq, self.n_ctx_seq, self.n_batch = n_seq, n_ctx_seq, n_batch
        self.batch = self.lib.llama_batch_init(n_batch, 0, 1)
        self.current: tuple | None = None  # the adapter set applied now: ((file, scale), ...)

    def set_adapters(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """Apply exactly these (GGUF LoRA file, scale) pairs to later decodes; () = the plain base."""
        if adapters == self.current:
            return
        n = len(adapters)
        handles = self.ffi.new("struct llama_adapter_lora *[]", [self.model.lora(f) for f, _ in adapters] or 1)
        scales = self.ffi.new("float[]", [float(s) for _, s in adapters] or 1)
        if self.lib.llama_set_adapters_lora(self.ptr, handles if n else self.ffi.NULL, n,
                                            scales if n else self.ffi.NULL) != 0:
            raise LlamaCppError(f"llama.cpp refused the adapter set {adapters}")
        self.current = adapters

    def clear(self, seq: int | None = None) -> None:
        """Forget one sequence's KV entries (every sequence's with None)."""
        if seq is None:
            self.lib.llama_memory_clear(self.memory, True)
        else:
            self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def decode(self, items: list[tuple[int, list[int], int]], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run tokens through the model. `items`: (sequence, tokens, position of the first token).
        Returns per item the logits of its last token ([vocab]), or of every token ([n, vocab])."""
        flat = [(seq, tok, pos + i, i == len(toks) - 1 or all_logits)
                for seq, toks, pos in items for i, tok in enumerate(toks)]
        out: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        n_vocab = self.model.n_vocab
        b = self.batch
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            for i, (seq, tok, pos, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            b.n_tokens = len(chunk)
            status = self.lib.llama_decode(self.ptr, b)
            if status != 0:
                raise LlamaCppError(f"llama_decode failed with status {status} (context full?)")
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    ptr = self.lib.llama_get_logits_ith(self.ptr, i)
                    rows.append(np.frombuffer(self.ffi.buffer(ptr, 4 * n_vocab), dtype=np.float32).copy())
        if not all_logits:
            return rows
        at = 0
        for _, toks, _ in items:
            out.append(np.stack(rows[at:at + len(toks)]))
            at += len(toks)
        return out

    def close(self) -> None:
        if self.ptr is not None:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ptr)
            self.ptr = None
