"""The ``fga-search`` command line: search (the default), ``report`` and ``export``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from ._errors import first_line, os_error_line
from ._paths import check_out_path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        self.exit(2, f"fga-search: error: {message}\n")


def _add_search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to compress")
    g.add_argument(
        "--model",
        help="zoo name (resnet56, vgg16_cifar, ...), torchvision name, or pkg.module:factory; default: the quickstart's digits CNN",
    )
    g.add_argument("--weights", help="the trained model's state_dict (loaded with weights_only=True)")
    g.add_argument("--dataset", default="digits", help="digits (default), cifar10, cifar100 or imagefolder")
    g.add_argument(
        "--data-dir",
        help="dataset folder (torchvision's CIFAR format, or an ImageFolder tree with train/ and val/ or test/)",
    )
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-dir if missing")
    g.add_argument("--image-size", type=int, help="resize ImageFolder images to this size (pixels)")
    g = p.add_argument_group("the search")
    g.add_argument(
        "--budget",
        type=float,
        default=0.2,
        help="max cost as a fraction of the original's, in (0, 1] (default 0.2)",
    )
    g.add_argument(
        "--budget-metric",
        default="flops",
        choices=["flops", "params", "latency"],
        help="what --budget limits: FLOPs (default), params, or latency measured on --target",
    )
    g.add_argument(
        "--trials", type=int, help="trials to finish, resumed runs included (default 40; quickstart 50)"
    )
    g.add_argument(
        "--epochs",
        type=float,
        help="fine-tuning epochs per trial, fractions allowed; 0 = no fine-tuning (default 1; quickstart 3)",
    )
    g.add_argument(
        "--sampler",
        default="nsga2",
        choices=["nsga2", "tpe", "random"],
        help="Optuna sampler (default nsga2)",
    )
    g.add_argument("--population", type=int, help="NSGA-II population size (default: trials/4, 4..50)")
    g.add_argument(
        "--space",
        help="search space: a shipped name (default, resnet_cifar, vgg_cifar, torchvision_resnet) or a YAML path",
    )
    g.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the validation split, the sampler and the trials (default 0)",
    )
    g.add_argument(
        "--strategy",
        default="search",
        choices=["search", "uniform", "error-alloc", "random"],
        help="search (default; warm-started from the rule-based plans), or a baseline: uniform, "
        "error-alloc (data-free error allocation), random",
    )
    g.add_argument(
        "--no-warm-start",
        dest="warm_start",
        action="store_false",
        help="start the search from random plans instead of the uniform and error-allocation plans",
    )
    g.add_argument(
        "--objective",
        default="accuracy,flops",
        choices=["accuracy,flops", "accuracy,latency", "accuracy,flops,latency"],
        help="what the search trades off (default accuracy,flops); latency is measured on --target",
    )
    g.add_argument("--target", help="the deployment target for latency: cpu, cpu:THREADS, cuda or cuda:N")
    g.add_argument("--target-batch", type=int, default=1, help="batch size on the target (default 1)")
    g.add_argument(
        "--target-dtype",
        default="float32",
        choices=["float32", "bf16", "fp16"],
        help="dtype on the target (default float32)",
    )
    g.add_argument(
        "--target-memory-format",
        choices=["nchw", "channels_last"],
        help="memory format of the activations on the target (default channels_last on CUDA, nchw on CPU)",
    )
    g.add_argument(
        "--front-latency-runs",
        type=int,
        default=30,
        help="without --target, time the front's members and the original side by side on this CPU after "
        "the search (batch 1, as exported), medians of this many runs (>= 10; 0 skips; default 30)",
    )
    g = p.add_argument_group("each trial")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size (default 128)")
    g.add_argument("--lr", type=float, default=0.02, help="peak fine-tuning learning rate (default 0.02)")
    g.add_argument("--compile", action="store_true", help="torch.compile each trial's model for fine-tuning")
    g.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN autotune every new conv shape during trials (off: each trial brings new FGA shapes)",
    )
    g.add_argument(
        "--device-data-gb",
        type=float,
        default=8.0,
        help="datasets up to this size (uint8) live on the GPU; larger ones stay in pinned host memory (default 8)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=0,
        help="threads decoding an ImageFolder tree on first use (default 0: up to 8)",
    )
    g.add_argument(
        "--calibration", type=int, default=256, help="images for data-driven refinement (default 256)"
    )
    g.add_argument(
        "--recalibration", type=int, default=1024, help="images for BN recalibration (default 1024)"
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="validation split held out of the training data (default 0.1)",
    )
    g.add_argument("--train-limit", type=int, help="use a stratified subset of this many training images")
    g.add_argument("--val-limit", type=int, help="use a stratified subset of this many validation images")
    g.add_argument("--test-limit", type=int, help="use a stratified subset of this many test images")
    g = p.add_argument_group("Ray cluster (see docs/ray.md)")
    g.add_argument(
        "--backend",
        default="optuna",
        choices=["optuna", "ray"],
        help="optuna (embedded, default) or ray (Ray Tune trials)",
    )
    g.add_argument("--ray-address", help="join this Ray cluster (auto or HOST:PORT); implies --backend ray")
    g.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per trial; fractions such as 0.25 share a GPU (default: 1 if the cluster has GPUs)",
    )
    g.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help="CPUs per trial (default 1, or N with a --target cpu:N: its latency is timed on N threads)",
    )
    g.add_argument(
        "--max-concurrent", type=int, help="max trials running at once (default: as resources allow)"
    )
    g.add_argument(
        "--storage-path",
        help="Ray Tune experiment storage: a path shared by all nodes (default: the run folder)",
    )
    g.add_argument(
        "--ray-dashboard",
        action="store_true",
        help="start Ray's dashboard with a local instance (off by default)",
    )
    g = p.add_argument_group("storage")
    g.add_argument(
        "--out", help="run folder (default runs/MODEL-DATASET-bBUDGET); an existing one is resumed"
    )
    g.add_argument(
        "--storage",
        help="Optuna RDB URL for the study (default: sqlite in the run folder). The study's name does "
        "not depend on where the run folder lies, so copies of a run folder share the study in it",
    )
    g.add_argument(
        "--study-name",
        help="study name in the storage (default: the one run.json records, made from the run's "
        "identity and a random run id when the run was created)",
    )
    g.add_argument("--quiet", action="store_true", help="print only the final summary")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fga-search",
        description="Compress a trained CNN by filter group approximation: a multi-objective search "
        "(validation accuracy vs FLOPs) over per-layer group counts and ranks, within a budget.",
        epilog="After a search: 'fga-search report RUN_DIR' writes the run's report (HTML and Markdown); "
        "'fga-search export RUN_DIR --pick best|knee|TRIAL_ID --out DIR' exports a model. "
        "See 'fga-search report -h' and 'fga-search export -h'.",
    )
    _add_search_options(parser)
    return parser


COMMANDS = ("report", "export")


def _command_parser(command: str) -> argparse.ArgumentParser:
    if command == "report":
        p = _Parser(
            prog="fga-search report",
            description="Write report.html (one self-contained file) and report.md (+ report_files/) "
            "for a run folder: the Pareto front, its members, their per-layer plans.",
        )
        p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of a search")
        p.add_argument("--out", help="folder to write the report to (default: the run folder)")
        return p
    p = _Parser(
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
    p.add_argument("--format", default="", metavar="torchscript,onnx", help="extra formats, comma-separated")
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
    from ._report import write_report

    if args.out is not None:
        check_out_path(args.out)

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
    from ._export import ExportVerificationError, export

    check_out_path(args.out)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    try:
        result = export(
            args.run_dir,
            pick=args.pick,
            out=args.out,
            finetune_epochs=args.finetune_epochs,
            finetune_lr=args.finetune_lr,
            finetune_batch_size=args.finetune_batch_size,
            formats=formats,
            device=args.device,
            latency_runs=args.latency_runs,
            quiet=args.quiet,
        )
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


def _search(args: argparse.Namespace) -> int:
    from ._config import RunConfig
    from ._search import run_search

    if args.out is not None:
        check_out_path(args.out)  # an empty --out is refused, not replaced by the default
    model_name = args.model or "digits_cnn"
    out = args.out or os.path.join(
        "runs", f"{model_name.replace(':', '_').replace('.', '_')}-{args.dataset}-b{args.budget:g}"
    )
    if args.ray_address is not None:
        args.backend = "ray"
    quickstart = args.model is None
    if args.trials is None:
        args.trials = 50 if quickstart else 40
    if args.epochs is None:
        args.epochs = 3.0 if quickstart else 1.0
    options = {k: v for k, v in vars(args).items() if k in RunConfig.field_names()}
    options["out"] = out
    config = RunConfig(**options)
    result = run_search(config)
    base = result.baseline
    print(f"run folder: {result.run_dir}")
    print(
        f"trials: {result.finished} finished ({result.trials} recorded) in {os.path.join(result.run_dir, 'trials.parquet')}"
    )
    print(f"Pareto front: {len(result.front)} models in {os.path.join(result.run_dir, 'pareto.parquet')}")
    if base:
        print(
            f"original: val accuracy {base['val_acc']:.4f}, test {base['test_acc']:.4f}, {base['macs'] / 1e6:.2f} M MACs"
        )
    for row in result.front:  # marked by the run's objective (_pareto.mark_front), as pareto.parquet
        mark = " <- best within budget" if row.is_best else (" <- knee" if row.is_knee else "")
        test = f", test {row.test_acc:.4f}" if row.test_acc is not None else ""
        if row.latency_ratio is not None:
            latency = f", latency {row.latency_ratio:.3f}"
        elif row.cpu_latency_ratio is not None:
            latency = f", CPU latency {row.cpu_latency_ratio:.3f}"
        else:
            latency = ""
        print(
            f"  trial {row.trial:>4}: val {row.val_acc:.4f}{test}, FLOPs {row.flops_ratio:.3f}"
            f"{latency}, params {row.params_ratio:.3f}{mark}"
        )
    if any(row.cpu_latency_ratio is not None for row in result.front):
        print(
            "CPU latency: ratio to the original's, timed side by side on this CPU after the search (batch 1, "
            "eager PyTorch; no --target was given, so the search optimised FLOPs; see front_latency.json)"
        )
    if result.best is not None:
        ckpt = os.path.join(result.run_dir, "models", f"trial_{result.best.trial:05d}.pt")
        if os.path.isfile(ckpt):
            print(f"best model: trial {result.best.trial}, weights {ckpt}")
        else:  # its checkpoint was not kept (e.g. a full disk): the export re-runs it
            print(
                f"best model: trial {result.best.trial} (no checkpoint kept; "
                "'fga-search export' re-runs it from its plan and seed)"
            )
    else:
        print("no finished trial within the budget yet")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # a subcommand; anything else is the search's options
        args = _command_parser(argv[0]).parse_args(argv[1:])
        run = _report if argv[0] == "report" else _export
    else:
        args = _parser().parse_args(argv)
        run = _search
    try:
        return run(args)
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
