"""The ``fga-search report`` and ``fga-search export`` subcommands, and the parser class that
every command's line is read with."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from fga_search._util._paths import check_out_path

__all__ = ["COMMANDS", "Parser", "command_parser", "run_command"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        self.exit(2, f"fga-search: error: {message}\n")


COMMANDS = ("report", "export")


def _formats(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def command_parser(command: str) -> argparse.ArgumentParser:
    if command == "report":
        p = Parser(
            prog="fga-search report",
            description="Write report.html (one self-contained file) and report.md (+ report_files/) "
            "for a run folder: the Pareto front, its members, their per-layer plans.",
        )
        p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
        p.add_argument("--out", help="folder to write the report to (default: the run folder)")
        return p
    p = Parser(
        prog="fga-search export",
        description="Export one model of a run: model.pt (a state_dict) and spec.json, optionally "
        "TorchScript and ONNX, each verified against the PyTorch model. Load it back with "
        "fga_search.load_exported(DIR).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
    p.add_argument(
        "--pick",
        default="best",
        metavar="best|knee|TRIAL_ID",
        help="best: the highest validation accuracy within the budget (default); knee: the front's knee; "
        "or a finished trial's id",
    )
    p.add_argument(
        "--out",
        required=True,
        help="folder to write the model to (created; an earlier export there is replaced)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=float,
        default=0.0,
        help="fine-tune this many more epochs on train+val with distillation and random crops (default 0)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        help="peak learning rate of that fine-tune (default: the run's --lr)",
    )
    p.add_argument(
        "--finetune-batch-size",
        type=int,
        help="batch size of that fine-tune (default: the run's --batch-size)",
    )
    p.add_argument(
        "--format",
        dest="formats",  # export()'s keyword: the options are its keyword arguments
        type=_formats,
        default="",
        metavar="torchscript,onnx",
        help="extra formats, comma-separated",
    )
    p.add_argument(
        "--device", help="cpu, cuda or cuda:N for re-running and fine-tuning (default: cuda if available)"
    )
    p.add_argument(
        "--latency-runs",
        type=int,
        default=50,
        help="time the exported and the original model side by side on this CPU at batch 1, in PyTorch "
        "and (with --format onnx) ONNX Runtime: medians of this many runs (>= 10; 0 skips; default 50)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the result (no progress lines for a re-run trial or the final fine-tune)",
    )
    return p


def _report(args: argparse.Namespace) -> int:
    from fga_search.engine._views import rebuild_views
    from fga_search.report._report import write_report

    if args.out is not None:
        check_out_path(args.out)
    if rebuild_views(args.run_dir):  # trials.parquet and pareto.parquet, from the study alone
        print(f"views: {os.path.join(args.run_dir, 'trials.parquet')}, pareto.parquet (from the study)")
    html_path, md_path = write_report(args.run_dir, out=args.out)
    print(f"report: {html_path}")
    print(f"        {md_path}")
    return 0


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _print_export_latency(lat: dict[str, Any]) -> None:
    dtype = lat.get("dtype", "float32")
    onnx_name = "ONNX Runtime" if dtype == "float32" else "ONNX Runtime (float32)"
    runtimes = {"PyTorch": lat["pytorch"], onnx_name: lat.get("onnxruntime")}
    cells = [
        f"{name} {r['ratio']:.2f}x the original ({r['ms']:.3g} vs {r['original_ms']:.3g} ms)"
        for name, r in runtimes.items()
        if r
    ]
    if "onnxruntime" in lat and lat["onnxruntime"] is None:
        cells.append("ONNX Runtime not measured (onnxruntime not installed)")
    layout = "channels_last, " if lat.get("memory_format") == "channels_last" else ""
    print(
        f"latency on this CPU ({lat['device']}, batch {lat.get('batch', 1)}, {dtype}, {layout}"
        f"medians of {lat['runs']} runs side by side): " + "; ".join(cells)
    )
    if lat["pytorch"].get("measured_by") == "search":
        print(
            "          PyTorch: the search's measurement of this front member, as exported, against the "
            "original with its batch norms folded alike; not timed again"
        )
    fair = lat.get("pytorch_vs_folded_original")
    if fair:
        print(
            f"          against the original with its batch norms folded alike: PyTorch {fair['ratio']:.2f}x "
            f"({fair['ms']:.3g} vs {fair['original_ms']:.3g} ms)"
        )
    slower = [name for name, r in runtimes.items() if r and r["ratio"] > 1]
    if slower:
        print(
            f"warning: the exported model is slower than the original in {' and '.join(slower)}: "
            "FLOPs are not speed; search with --objective accuracy,latency --target cpu:N for this device"
        )


def _export(args: argparse.Namespace) -> int:
    from fga_search.exporter._export import ExportVerificationError, export

    check_out_path(args.out)
    options = vars(args).copy()  # the export command's options are export()'s keyword arguments
    try:
        result = export(options.pop("run_dir"), **options)
    except ExportVerificationError as exc:
        print(f"fga-search: error: {exc}", file=sys.stderr)
        return 1
    spec = result.spec
    orig = spec["original"]
    how = {"best": "best within the budget", "knee": "knee of the front", "trial": "picked by id"}[
        result.pick
    ]
    weights = "re-run from its plan and seed" if result.rebuilt else "the run's checkpoint"
    print(f"exported trial {result.trial} ({how}; weights: {weights}) to {result.out}")
    for path in result.files:
        print(f"  {os.path.basename(path):<22} {_size(path):>10}")
    if spec.get("finetune"):
        ft = spec["finetune"]
        recipe = ft["recipe"]
        print(
            f"fine-tuned {ft['epochs']:g} more epochs on train+val ({ft['steps']} steps of batch "
            f"{recipe['batch_size']}, peak learning rate {recipe['lr']:g})"
        )
    val = "" if spec["accuracy"]["val_held_out"] else " (seen in fine-tuning)"
    print(
        f"accuracy: val {result.val_acc:.4f}{val}, test {result.test_acc:.4f} "
        f"(original: val {orig['val_acc']:.4f}, test {orig['test_acc']:.4f})"
    )
    flops = spec["flops"]
    print(
        f"FLOPs:    {flops['macs'] / 1e6:.3f} M MACs = {100 * flops['ratio']:.1f} % of the original's "
        f"{flops['original_macs'] / 1e6:.3f} M (measured with FlopCounterMode)"
    )
    if spec.get("latency"):
        lat = spec["latency"]
        share = f" = {100 * lat['ratio']:.1f} % of the original's" if lat.get("ratio") is not None else ""
        print(f"latency:  {lat['ms']:.3g} ms{share} (measured during the search)")
    cpu = spec.get("cpu_execution")
    if cpu and cpu.get("candidates"):
        if cpu.get("kept"):
            ways = list(cpu["layers"].values())
            runs = " and ".join(
                f"{ways.count(way)} {what}"
                for way, what in (
                    ("block_diagonal", "run their grouped conv as a block-diagonal dense conv"),
                    ("dense", "run folded into one dense conv"),
                )
                if way in ways
            )
            print(
                f"CPU:      of the {cpu['candidates']} FGA layers, {runs} on CPU inputs (the model: "
                f"{cpu['after_ms'] / cpu['before_ms']:.2f}x the time of all-grouped, measured side by side)"
            )
        else:
            print(
                f"CPU:      the {cpu['candidates']} FGA layers stay grouped (no other execution was faster here)"
            )
    fold = spec.get("bn_fold")
    if fold:
        count = len(fold["pairs"])
        change = (
            f"the model: {fold['after_ms'] / fold['before_ms']:.2f}x the time unfolded, measured side by side"
        )
        print(
            f"BN:       {count} batch norm(s) folded into the convs before them ({change})"
            if fold["kept"]
            else f"BN:       the {count} batch norm(s) after convs stay unfolded (folding was not faster here: {change})"
        )
    graph = spec.get("onnx_graph")
    if graph:
        ms = graph["onnxruntime_ms"]
        if graph["graph"] == "cpu_execution":
            print(
                f"ONNX:     its graph runs the FGA layers as on the CPU above ({ms['cpu_execution']:.3g} ms "
                f"in ONNX Runtime, against {ms['grouped']:.3g} ms with grouped convs)"
            )
        else:
            print(
                f"ONNX:     its graph keeps grouped convs ({ms['grouped']:.3g} ms in ONNX Runtime, against "
                f"{ms['cpu_execution']:.3g} ms as on the CPU above)"
            )
    if spec.get("latency_at_export"):
        _print_export_latency(spec["latency_at_export"])
    params = spec["params"]
    print(
        f"params:   {params['count']:,} = {100 * params['ratio']:.1f} % of the original's {params['original']:,}"
    )
    checks = ", ".join(
        f"{name} {'not checked (onnxruntime not installed)' if diff is None else f'max |diff| {diff:.2g}'}"
        for name, diff in result.verification.items()
    )
    check = spec["verification"]
    print(
        f"verified: {checks} (tolerance {check['tolerance']:.2g} = 1e-4 x max(1, max |output| "
        f"{check['max_abs_output']:.3g}))"
    )
    return 0


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run the ``report`` or ``export`` command with its parsed options."""
    return _report(args) if command == "report" else _export(args)
