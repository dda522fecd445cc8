"""vLLM worker extension (`worker_extension_cls`): reached on every worker by `collective_rpc`,
from `LLM.collective_rpc` (colocated engine) or from the `/collective_rpc` endpoint of `vllm serve`
(server mode, `VLLM_SERVER_DEV_MODE=1`).

Methods are mixed into vLLM's worker class, so `self` is the worker (`self.model_runner`,
`self.reload_weights`). Kept free of vLLM imports so the class resolves cheaply in any process.
Over HTTP, vLLM passes RPC arguments as strings ("only serialized string args", in its
`/collective_rpc` handler), so list arguments also arrive JSON-encoded.

Every change of the skip set or the weights bumps a counter (`version` in `nested_reft_info`): a
client that records it after its own change and finds another one after sampling knows that
someone else changed the server in between.

Files: in server mode anyone who reaches the port can call these methods (vLLM's `--api-key` does
not guard `/collective_rpc`), so the two that open a file take only the files a trainer writes
(`nested_reft_weights_*.safetensors`, `nested_reft_probe_*.txt`), directly in the weights folder
(`NESTED_REFT_WEIGHTS_DIR`, set by `python -m nested_reft.serve --weights-dir`; default /dev/shm),
after resolving links and `..`; `nested_reft_use_kept` takes only a JSON list of layer indices. `weights_file` is the writer's side: a fresh name in that folder,
removed after the load, also when the trainer is stopped with SIGTERM or exits, and, when it was
killed outright, by the next writer on the same machine.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading

logger = logging.getLogger(__name__)

# vLLM's in-place reload warns about every layer that received no tensor; a partial update (only
# what an optimizer step changed, e.g. LoRA-merged modules) is intended here, and the layers not
# sent keep their values (tests/nested_reft/test_vllm_engine.py checks it).
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")

WEIGHTS_DIR_ENV = "NESTED_REFT_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
WEIGHTS_FILE = ("nested_reft_weights_", ".safetensors")  # (prefix, suffix) of the files the trainer writes
PROBE_FILE = ("nested_reft_probe_", ".txt")


def worker_weights_dir() -> str:
    """The one folder this process's workers read files from, links resolved."""
    return os.path.realpath(os.path.expanduser(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR))


def allowed_file(path: str, kind: tuple[str, str]) -> str:
    """`path` with links and `..` resolved, if it is a file of `kind` directly in the weights folder;
    otherwise PermissionError (the path comes from the network in server mode)."""
    real, folder = os.path.realpath(path), worker_weights_dir()
    name = os.path.basename(real)
    if os.path.dirname(real) != folder or not (name.startswith(kind[0]) and name.endswith(kind[1])):
        raise PermissionError(f"refusing {path!r}: this worker reads only {kind[0]}*{kind[1]} files directly in "
                              f"{folder} (its weights folder, {WEIGHTS_DIR_ENV})")
    return real


class NestedReFTWorkerExtension:
    def _skip_model(self):
        model = self.model_runner.get_model()
        if not (hasattr(model, "set_skip") or hasattr(model, "set_kept")):
            raise TypeError(
                f"the served model {type(model).__name__} is not skip-aware; build the LLM with "
                "hf_overrides={'architectures': [nested_reft.engines.vllm_plugin.skip_architecture(...)]}"
            )
        return model

    def _bump_version(self) -> None:
        self._nested_reft_version = getattr(self, "_nested_reft_version", 0) + 1

    def nested_reft_info(self) -> dict:
        model = self._skip_model()
        compact = hasattr(model, "set_kept")
        return {"num_layers": model.num_decoder_layers, "model_class": type(model).__name__,
                "slots": len(model.model.layers), "compact": compact,
                "kept": list(model.nested_reft_kept) if compact else None,
                "host_copy": getattr(model, "nested_reft_host", None) is not None,
                "compiled": not self.vllm_config.model_config.enforce_eager,
                "skip": sorted(model.nested_reft_skip), "version": getattr(self, "_nested_reft_version", 0)}

    def nested_reft_set_skip(self, layers: list[int] | str) -> list[int]:
        model = self._skip_model()
        model.set_skip(json.loads(layers) if isinstance(layers, str) else layers)
        self._bump_version()
        return sorted(model.nested_reft_skip)

    def nested_reft_set_kept(self, kept: list[int] | str, weights) -> list[int]:
        """Compact model: assign the kept layers to its slots and load the weights of the layers
        that moved (`weights` as in `nested_reft_load_weights`; it must cover them). Returns the
        layers that moved."""
        model = self._skip_model()
        if not hasattr(model, "set_kept"):
            raise TypeError(f"the served model {type(model).__name__} is not a compact model")
        previous = model.nested_reft_kept
        moved = model.set_kept(json.loads(kept) if isinstance(kept, str) else kept)
        named = self._named(weights)
        from .vllm_compiled import layer_of

        sent = {layer_of(name) for name, _ in named}
        if missing := sorted(set(moved) - sent):
            model.set_kept(previous)
            raise ValueError(f"layers {missing} moved into a slot but no weights came with them")
        self._reload(named)
        return moved

    def nested_reft_use_kept(self, kept: list[int] | str) -> list[int]:
        """Server mode (compact model with a host copy): assign the kept layers to the slots and load
        the layers that moved from this worker's own copy of every layer, which every weight update
        keeps current; the client sends only the list. Returns the layers that moved."""
        model = self._skip_model()
        host = getattr(model, "nested_reft_host", None)
        if host is None:
            raise TypeError(f"the served model {type(model).__name__} keeps no host copy of its layers; start the "
                            "server with python -m nested_reft.serve MODEL --skip-k K")
        previous = model.nested_reft_kept
        moved = model.set_kept(json.loads(kept) if isinstance(kept, str) else kept)
        from .vllm_compiled import layer_of

        named = [(name, tensor) for name, tensor in host.items() if layer_of(name) in moved]
        if missing := sorted(set(moved) - {layer_of(name) for name, _ in named}):
            model.set_kept(previous)
            raise RuntimeError(f"layers {missing} moved into a slot but this worker holds no weights for them")
        if named:
            self._reload(named)
        return moved

    def nested_reft_load_weights(self, weights) -> int:
        """Load checkpoint-format (Hugging Face named) tensors in place; returns how many.

        `weights` is a list of (name, tensor) pairs (in-process engine), or the path of a
        safetensors file (vLLM's multiprocessing mode, where tensors passed as RPC arguments
        arrive as lists, and server mode, where RPC arguments are strings)."""
        named = self._named(weights)
        self._reload(named)
        return len(named)

    def _named(self, weights) -> list:
        if isinstance(weights, str):
            from safetensors.torch import load_file

            return list(load_file(allowed_file(weights, WEIGHTS_FILE)).items())
        return list(weights)

    def _reload(self, named: list) -> None:
        loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=named, is_checkpoint_format=True)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
        self.nested_reft_after_weight_update()

    def nested_reft_after_weight_update(self) -> None:
        """What every weight update ends with, whoever loaded the tensors (our reload above, or
        vLLM's weight-transfer engines behind `/update_weights`)."""
        self._retie_embeddings()
        self._bump_version()

    def nested_reft_read_text(self, path: str) -> str:
        """The contents of a small text file: the client checks that the folder it writes weight
        files to is the one this worker reads (server mode, weight_transfer 'file'). Probe files only."""
        fd = os.open(allowed_file(path, PROBE_FILE), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            return f.read(4096)

    def _retie_embeddings(self) -> None:
        """A tied LM head is never loaded itself, so the reload does not re-run its post-load
        processing: on CPU that processing packs the weight for the GEMM kernel, and the head would
        keep computing logits with the *old* embedding. Re-tie it and process it again."""
        model = self.model_runner.get_model()
        config = getattr(model, "config", None)
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if getattr(config, "tie_word_embeddings", False) and hasattr(head, "weight") and hasattr(embed, "weight"):
            head.weight = embed.weight
            quant_method = getattr(head, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(head)

    def nested_reft_pid(self) -> int:
        return os.getpid()


# ---------------------------------------------------------------------- the writer's side

_written: set[str] = set()  # weight files of this process that exist now
_swept: set[str] = set()  # folders already cleared of files left by killed processes


def _writer() -> str:
    """This machine and PID namespace, where the pid in a file name means this process: containers
    that share /dev/shm (and often the hostname) have PID namespaces of their own."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        namespace = "0"
    return f"{socket.gethostname().replace('_', '-')}-{namespace}"  # "_" separates the fields of a name


def _remove_written() -> None:
    for path in list(_written):
        with contextlib.suppress(OSError):
            os.unlink(path)
        _written.discard(path)


atexit.register(_remove_written)


def _remove_files_of_dead_processes(folder: str) -> None:
    """Weight files that processes of this machine left when they were killed (SIGKILL, OOM):
    each name carries its writer's machine, PID namespace and pid. Others' files are left alone."""
    if folder in _swept:
        return
    _swept.add(folder)
    prefix = f"{WEIGHTS_FILE[0]}{_writer()}_"
    for name in os.listdir(folder):
        pid = name[len(prefix):].split("_", 1)[0]
        if not (name.startswith(prefix) and name.endswith(WEIGHTS_FILE[1]) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: its file is garbage
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
            logger.info("removed %s, left in %s by a killed trainer process", name, folder)
        except PermissionError:  # alive, another user's
            pass


def _on_sigterm_remove_written():
    """While a weight file exists, SIGTERM removes it first, then does what it did before (by
    default: end the process, which would skip every `finally`). Returns the undo. Signal
    handlers can be set from the main thread only; elsewhere atexit is the only cleanup."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # a handler set outside Python: leave it
        return lambda: None

    def handler(signum, frame):
        _remove_written()
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def weights_file(folder: str):
    """A fresh `nested_reft_weights_<host>-<pidns>_<pid>_*.safetensors` path in `folder` for one sync;
    the file is gone when the block ends, and also when the process ends inside it (above)."""
    _remove_files_of_dead_processes(folder)
    fd, path = tempfile.mkstemp(prefix=f"{WEIGHTS_FILE[0]}{_writer()}_{os.getpid()}_", suffix=WEIGHTS_FILE[1], dir=folder)
    os.close(fd)
    _written.add(path)
    undo = _on_sigterm_remove_written()
    try:
        yield path
    finally:
        undo()
        _written.discard(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
