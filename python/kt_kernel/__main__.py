"""Command line: `kt-kernel <command>` or `python -m kt_kernel <command>`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="kt-kernel")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run a MoE layer at a real model's shape; print accuracy and speed", add_help=False)
    sub.add_parser("info", help="CPU features, NUMA topology and available backends")
    sub.add_parser("convert", help="convert Hugging Face safetensors or GGUF experts into kt_kernel files",
                   add_help=False)
    if argv and argv[0] == "convert":
        from .weights.convert import main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
        return 0
    a = p.parse_args(argv)
    if a.command == "info":
        import kt_kernel

        print(json.dumps({"version": kt_kernel.__version__, "backends": kt_kernel.backends(),
                          "cpu": kt_kernel.cpu_info()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
