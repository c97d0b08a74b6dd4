"""The ``fga-search`` command line: search (the default), ``report`` and ``export``.

The search's options are :class:`RunConfig`'s fields: each field's metadata (``Option``) gives
its flag, help, group and choices, its type and default come from the field itself."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING

from fga_search._cli_commands import COMMANDS, Parser, command_parser, run_command
from fga_search._util._errors import first_line, os_error_line
from fga_search._util._paths import check_out_path

if TYPE_CHECKING:
    from fga_search.engine._config import RunConfig
    from fga_search.engine._policy import SearchResult
    from fga_search.runs._records import FrontRecord

__all__ = ["main"]

_TYPES = {"int": int, "float": float}  # a field's annotation (without "| None") -> argparse type


def _add_search_options(p: argparse.ArgumentParser) -> None:
    from fga_search.engine._config import RunConfig
    from fga_search.engine._option import flag_of, option_of

    options = [(f, cli) for f in fields(RunConfig) if (cli := option_of(f)) is not None]  # None: API only
    groups = {title: p.add_argument_group(title) for title in dict.fromkeys(cli.group for _, cli in options)}
    for f, cli in options:
        kwargs: dict[str, object] = {"help": cli.text(f.default).replace("%", "%%")}
        if f.type == "bool":
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            # no default where the command line makes one: the run folder, and the quickstart's
            unset = f.default is MISSING or cli.quickstart is not None
            kwargs["default"] = None if unset else f.default
            kwargs["type"] = _TYPES.get(str(f.type).removesuffix(" | None"))
            kwargs["choices"] = cli.choices
            kwargs["metavar"] = cli.metavar
        groups[cli.group].add_argument(flag_of(f), dest=f.name, **kwargs)  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fga-search",
        description="Compress a trained CNN by filter group approximation: a multi-objective search "
        "(validation accuracy vs FLOPs) over per-layer group counts and ranks, within a budget.",
        epilog="After a search: 'fga-search report RUN_DIR' writes the run's report (HTML and Markdown); "
        "'fga-search export RUN_DIR --pick best|knee|TRIAL_ID --out DIR' exports a model. "
        "See 'fga-search report -h' and 'fga-search export -h'.",
    )
    _add_search_options(parser)
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    """The search's RunConfig from its command line, with the defaults the command line makes: the
    run folder's, ``--ray-address``'s backend, and the quickstart's (no ``--model``)."""
    from fga_search.engine._config import RunConfig
    from fga_search.engine._option import option_of

    if args.out is not None:
        check_out_path(args.out)  # an empty --out is refused, not replaced by the default
    options = vars(args).copy()
    model_name = args.model or "digits_cnn"
    options["out"] = args.out or os.path.join(
        "runs", f"{model_name.replace(':', '_').replace('.', '_')}-{args.dataset}-b{args.budget:g}"
    )
    if args.ray_address is not None:
        options["backend"] = "ray"
    if args.rungs is not None:  # the rungs give the epochs: an --epochs beside them is refused
        if args.epochs is not None:
            raise ValueError(f"--rungs gives each rung's fine-tuning epochs: drop --epochs {args.epochs:g}")
        options["epochs"] = next(f.default for f in fields(RunConfig) if f.name == "epochs")
    for f in fields(RunConfig):
        cli = option_of(f)
        if cli is not None and cli.quickstart is not None and options[f.name] is None:
            options[f.name] = cli.quickstart if args.model is None else f.default
    return RunConfig(**options)


def _search(args: argparse.Namespace) -> int:
    from fga_search.engine._search import run_search

    result = run_search(_config(args))
    for line in _summary(result):
        print(line)
    return 0


def _pick_mark(row: FrontRecord) -> str:
    """`` <- best within budget`` or `` <- knee``, saying so when the pick is slower than the original."""
    from fga_search.runs._pareto import slower_than_original

    if not (row.is_best or row.is_knee):
        return ""
    slow = slower_than_original(row)
    why = f" (slower than the original {slow.where}: {slow.times} its latency)" if slow else ""
    return (" <- best within budget" if row.is_best else " <- knee") + why


def _slower_warning(row: FrontRecord) -> str | None:
    """One line when the best model runs slower than the original, or None."""
    from fga_search.runs._pareto import slower_than_original

    slow = slower_than_original(row)
    if slow is None:
        return None
    flops = row.flops_ratio
    fewer = (
        f": its fewer FLOPs ({flops:.3f} of the original's) do not make it faster here"
        if flops is not None and flops < 1.0
        else ""
    )
    search = "--budget-metric latency" + (" --target cpu" if slow.on == "cpu" else "")
    return (
        f"warning: the best model runs {slow.times} the original's latency {slow.where}{fewer}; "
        f"to search for speed, try {search}"
    )


def _summary(result: SearchResult) -> list[str]:
    """What the search prints when it ends: the run folder, the front (best and knee marked, and
    said to be slower than the original where they are), the best model."""
    base = result.baseline
    lines = [
        f"run folder: {result.run_dir}",
        f"trials: {result.finished} finished ({result.trials} recorded) in {os.path.join(result.run_dir, 'trials.parquet')}",
        f"Pareto front: {len(result.front)} models in {os.path.join(result.run_dir, 'pareto.parquet')}",
    ]
    if base:
        lines.append(
            f"original: val accuracy {base['val_acc']:.4f}, test {base['test_acc']:.4f}, {base['macs'] / 1e6:.2f} M MACs"
        )
    for row in result.front:  # marked by the run's objective (_pareto.mark_front), as pareto.parquet
        test = f", test {row.test_acc:.4f}" if row.test_acc is not None else ""
        if row.latency_ratio is not None:
            latency = f", latency {row.latency_ratio:.3f}"
        elif row.cpu_latency_ratio is not None:
            latency = f", CPU latency {row.cpu_latency_ratio:.3f}"
        else:
            latency = ""
        lines.append(
            f"  trial {row.trial:>4}: val {row.val_acc:.4f}{test}, FLOPs {row.flops_ratio:.3f}"
            f"{latency}, params {row.params_ratio:.3f}{_pick_mark(row)}"
        )
    if any(row.cpu_latency_ratio is not None for row in result.front):
        lines.append(
            "CPU latency: ratio to the original's, timed side by side on this CPU after the search (batch 1, "
            "eager PyTorch; no --target was given, so the search optimised FLOPs; see front_latency.json)"
        )
    if result.best is None:
        lines.append("no finished trial within the budget yet")
        return lines
    ckpt = os.path.join(result.run_dir, "models", f"trial_{result.best.trial:05d}.pt")
    if os.path.isfile(ckpt):
        lines.append(f"best model: trial {result.best.trial}, weights {ckpt}")
    else:  # its checkpoint was not kept (e.g. a full disk): the export re-runs it
        lines.append(
            f"best model: trial {result.best.trial} (no checkpoint kept; "
            "'fga-search export' re-runs it from its plan and seed)"
        )
    warning = _slower_warning(result.best)
    if warning is not None:
        lines.append(warning)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # a subcommand; anything else is the search's options
        command = argv[0]
        args = command_parser(command).parse_args(argv[1:])
    else:
        command = "search"
        args = _parser().parse_args(argv)
    try:
        return _search(args) if command == "search" else run_command(command, args)
    except KeyboardInterrupt:
        print("fga-search: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"fga-search: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system's refusal (a full disk, a read-only folder, ...)
        print(f"fga-search: error: {os_error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
