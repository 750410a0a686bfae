"""The ``kvslim`` command line: one small module per command group, each a thin parse -> one library call.

| command | module | library call |
|---|---|---|
| ``plan`` | ``plan.py`` | ``kvslim.plan.plan`` |
| ``train``, ``finetune`` | ``train.py`` | ``kvslim.train.train_lm`` / ``finetune`` |
| ``eval ppl`` | ``eval.py`` | ``kvslim.eval.perplexity.eval_ppl`` |
| ``convert`` | ``convert.py`` | ``kvslim.convert.convert_checkpoint`` |
| ``generate`` | ``generate.py`` | ``kvslim.engine.serve.generate`` |
| ``serve`` | ``serve.py`` | ``kvslim.engine.serve.serve`` |
| ``bench serve`` | ``bench.py`` | ``kvslim.engine.bench.bench_serve`` |

To add a command, write a module with ``add(subparsers)`` that creates its parser and sets
``func`` (parsed args -> exit code), and list it in ``COMMANDS``. A ``ValueError`` from the
library (bad input, refused output) is printed as ``kvslim CMD: error: ...`` with exit code 2;
an ``OSError`` (disk full, permission denied while writing) the same way with exit code 1;
Ctrl-C exits with 130 without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvslim.cli import bench, convert, generate, plan, serve
from kvslim.cli import eval as eval_cmd
from kvslim.cli import train as train_cmd

COMMANDS = [plan.add, train_cmd.add_train, train_cmd.add_finetune, eval_cmd.add, convert.add, generate.add,
            serve.add, bench.add]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvslim", description="Fast LLM decoding with smaller KV caches (MHA/MQA/GQA/GTA/MLA/GLA)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"kvslim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kvslim {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvslim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
