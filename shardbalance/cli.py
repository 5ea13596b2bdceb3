"""The ``shardbalance`` command line.

    shardbalance coordinator --bind tcp://127.0.0.1:5555 --log coord.jsonl [--token-file F]
                             [--max-ranks N --max-runs N --plans-kept N --queue-mb MB
                              --journal-max-mb MB --senders-per-rank N]
    shardbalance simulate --ranks 4096 --speeds lognormal:0.5 --noise 0.1 --policy affine
    shardbalance report coord.jsonl [--run RUN] [--plot out.png] [--follow [--interval S]]
    shardbalance status --coordinator tcp://10.0.0.5:5555 [--token-file F] [--watch]

Imports are deferred to each command so a coordinator starts without importing torch.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _coordinator(args: argparse.Namespace) -> int:
    from ._env import read_environment, read_token
    from .coordinator import serve

    from .coordinator import Limits

    secret = read_token(args.token_file) if args.token_file else read_environment().token
    limits = Limits(max_ranks=args.max_ranks, max_runs=args.max_runs,
                    plans_kept=args.plans_kept, queue_bytes=int(args.queue_mb * (1 << 20)),
                    journal_max_bytes=int(args.journal_max_mb * (1 << 20)),
                    senders_per_rank=args.senders_per_rank)
    return serve(args.bind, args.log, secret, args.parent_pid, limits=limits)


def _report(args: argparse.Namespace) -> int:
    import os

    from ._exceptions import ConfigError
    from .report import _pyplot, follow, plot, summarize

    if args.plot:
        _pyplot()  # a missing extra is said before anything else happens
    if not args.interval > 0:
        raise ConfigError(f"Invalid --interval {args.interval!r}, it should be > 0 seconds")
    if args.follow:
        return follow(args.journal, args.run, args.plot, args.interval)
    if not os.path.isfile(args.journal):
        raise ConfigError(f"no journal at {args.journal!r}")
    print(summarize(args.journal, run=args.run))
    if args.plot:
        plot(args.journal, args.plot, run=args.run)
        print(f"plot written to {args.plot}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ._env import read_environment, read_token
    from ._exceptions import ConfigError, CoordinatorUnavailable
    from .status import watch

    if not args.interval > 0:
        raise ConfigError(f"Invalid --interval {args.interval!r}, it should be > 0 seconds")
    if not args.timeout > 0:
        raise ConfigError(f"Invalid --timeout {args.timeout!r}, it should be > 0 seconds")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"Invalid --count {args.count!r}, it should be >= 1")
    if not args.coordinator.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"Invalid --coordinator {args.coordinator!r}: expected "
                          "tcp://HOST:PORT")
    secret = read_token(args.token_file) if args.token_file else read_environment().token
    count = args.count if args.watch else 1
    try:
        return watch(args.coordinator, secret, args.run, args.interval, count, args.timeout)
    except CoordinatorUnavailable as exc:
        # A reply signed under another secret is dropped unread: it looks like no reply.
        raise CoordinatorUnavailable(f"{exc} (or its secret is not the one given: check "
                                     "--token-file / SHARDBALANCE_TOKEN)") from exc


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardbalance", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    coord = sub.add_parser("coordinator", help="run a standalone coordinator")
    coord.add_argument("--bind", required=True,
                       help="ZeroMQ endpoint to bind, e.g. tcp://10.0.0.5:5555 (port 0: any free)")
    coord.add_argument("--log", default=None,
                       help="JSONL journal: every decision, and what a restart resumes from")
    coord.add_argument("--token-file", default=None,
                       help="file with the shared secret (default: $SHARDBALANCE_TOKEN or "
                            "$SHARDBALANCE_TOKEN_FILE; none: accept unsigned messages)")
    coord.add_argument("--parent-pid", type=int, default=None,
                       help="exit when this process is gone (used by the embedded coordinator)")
    coord.add_argument("--max-ranks", type=int, default=16384,
                       help="ranks summed over all live runs; a run beyond it is refused "
                            "(default 16384)")
    coord.add_argument("--max-runs", type=int, default=256,
                       help="live runs (plan and pull); more are refused (default 256)")
    coord.add_argument("--plans-kept", type=int, default=256,
                       help="decided plans kept per run (default 256)")
    coord.add_argument("--queue-mb", type=float, default=16.0,
                       help="per connected peer and direction, MiB of queued messages "
                            "(default 16: the high-water mark is this over the largest "
                            "message, 1 MiB)")
    coord.add_argument("--journal-max-mb", type=float, default=256.0,
                       help="compact the journal (a snapshot of the live runs, then the tail) "
                            "when it grows past this (default 256; 0: never)")
    coord.add_argument("--senders-per-rank", type=int, default=4,
                       help="sender ids tracked per rank of a run for replay protection "
                            "(default 4; the least recently heard beyond it is forgotten)")
    coord.set_defaults(func=_coordinator)

    from .simulate import add_arguments

    simulate = sub.add_parser("simulate", help="run the real policies against modelled ranks")
    add_arguments(simulate)
    simulate.set_defaults(func=_simulate)

    report = sub.add_parser("report", help="summarize a coordinator journal")
    report.add_argument("journal", help="the coordinator's --log file")
    report.add_argument("--run", default=None, help="only this run id")
    report.add_argument("--plot", default=None, metavar="OUT.PNG",
                        help="also draw the run (the last one unless --run) to this PNG: batch "
                             "size, busy ms/step and step time against global step (needs the "
                             "plot extra: pip install 'shardbalance[plot]')")
    report.add_argument("--follow", action="store_true",
                        help="keep re-reading the journal as it is written; reprint the table "
                             "(and redraw the PNG) when records are added")
    report.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                        help="how often --follow re-reads the journal (default 2)")
    report.set_defaults(func=_report)

    status = sub.add_parser(
        "status", help="show what a running coordinator serves: per run the plan in force and "
                       "its predicted step time, per rank the newest batch size, busy time and "
                       "samples/s")
    status.add_argument("--coordinator", required=True, metavar="tcp://HOST:PORT",
                        help="the coordinator's address (an embedded one logs it, with the "
                             "--token-file to pass, when it starts)")
    status.add_argument("--token-file", default=None,
                        help="file with the coordinator's secret (default: $SHARDBALANCE_TOKEN "
                             "or $SHARDBALANCE_TOKEN_FILE; an embedded coordinator's is "
                             "<journal>.token while the job runs)")
    status.add_argument("--run", default=None, help="only this run id")
    status.add_argument("--watch", action="store_true",
                        help="refresh the table every --interval seconds until Ctrl-C "
                             "(or --count tables)")
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                        help="how often --watch refreshes (default 2)")
    status.add_argument("--count", type=int, default=None, metavar="N",
                        help="with --watch: stop after N tables")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for each reply (default 5)")
    status.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ._exceptions import ShardBalanceError

    try:
        return args.func(args)
    except ShardBalanceError as exc:
        print(f"shardbalance: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
