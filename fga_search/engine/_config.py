"""A search's settings, validated at the boundary: the one definition of the search's options.

Each field of :class:`RunConfig` carries its command-line option (``Option``: help text, group,
choices, ...) in its metadata; ``fga_search._cli`` builds the ``fga-search`` options from them,
so a default, a choice list or a help text is written once, here or in the registry it names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from fga_search.latency._latency_target import DTYPES, RUNTIMES

from ._config_checks import check
from ._option import option, options_doc
from ._study import SAMPLERS

if TYPE_CHECKING:
    from fga_search.latency import Target

    from ._rungs import Rungs

__all__ = ["BUDGET_METRICS", "STRATEGIES", "RunConfig"]

BUDGET_METRICS = ("flops", "params", "latency")
OBJECTIVES = ("accuracy,flops", "accuracy,latency", "accuracy,flops,latency")
BACKENDS = ("optuna", "ray")
# the search, or a rule-based baseline (fga_search.engine._strategies makes their plans)
STRATEGIES = ("search", "uniform", "error-alloc", "random")
MEMORY_FORMATS = ("nchw", "channels_last")
PROMOTE = ("continue", "rerun")  # how a promoted plan reaches its new rung (--promote)
VAL_FROM = ("train", "test")  # where --val-from takes the validation images

# the option groups of ``fga-search --help``, in order
WHAT, SEARCH, TRIAL, RAY, STORAGE = (
    "what to compress",
    "the search",
    "each trial",
    "Ray cluster (see docs/ray.md)",
    "storage",
)


def needs_latency(objective: str, budget_metric: str) -> bool:
    """Whether a run with this objective and budget metric measures latency on a target."""
    return "latency" in objective or budget_metric == "latency"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a search run needs: the one definition of the search's options.

    Each field is the command line's option of the same name (``--budget-metric`` is
    ``budget_metric``), with the same default and the same checks: a bad value raises
    ``ValueError`` naming the option and the value when the config is made. Pass it to
    ``fga_search.search(config)``; ``run.json`` records it (``to_dict``). ``model=None`` and
    ``dataset="digits"`` is the quickstart. Each field's default, flag, choices and help follow,
    by group, as ``fga-search --help`` prints them (``out`` is the run folder; an existing one is
    resumed; a "quickstart" default is the command line's, without ``--model``).
    """

    # what to compress
    model: str | None = option(
        None,
        help="zoo name (resnet56, vgg16_cifar, ...), torchvision name, or pkg.module:factory; "
        "default: the quickstart's digits CNN",
        group=WHAT,
    )
    weights: str | None = option(
        None, help="the trained model's state_dict (loaded with weights_only=True)", group=WHAT
    )
    dataset: str = option("digits", help="{default} (default), cifar10, cifar100 or imagefolder", group=WHAT)
    data_dir: str | None = option(
        None,
        help="dataset folder (torchvision's CIFAR format, or an ImageFolder tree with train/ and val/ or test/)",
        group=WHAT,
    )
    download: bool = option(False, help="download CIFAR into --data-dir if missing", group=WHAT)
    image_size: int | None = option(None, help="resize ImageFolder images to this size (pixels)", group=WHAT)
    # the search
    budget: float = option(
        0.2, help="max cost as a fraction of the original's, in (0, 1] (default {default:g})", group=SEARCH
    )
    budget_metric: str = option(
        "flops",
        help="what --budget limits: FLOPs (default), params, or latency measured on --target",
        group=SEARCH,
        choices=BUDGET_METRICS,
    )
    trials: int = option(
        40,
        help="trials to finish, resumed runs included (default {default}; quickstart {quickstart})",
        group=SEARCH,
        quickstart=50,
    )
    epochs: float = option(
        1.0,
        help="fine-tuning epochs per trial, fractions allowed; 0 = no fine-tuning "
        "(default {default:g}; quickstart {quickstart:g})",
        group=SEARCH,
        quickstart=3.0,
    )
    rungs: str | None = option(
        None,
        help="multi-fidelity: fine-tuning epochs per rung, e.g. 0,0.1,0.3,1 (0: the zero-cost proxy); "
        "plans enter at the first, the best 1/--eta of a rung move up (see docs/search.md); not with --epochs",
        group=SEARCH,
    )
    eta: int = option(
        3, help="with --rungs: the promotion ratio, an integer >= 2 (default {default})", group=SEARCH
    )
    promote: str = option(
        "rerun",
        help="with --rungs: a promoted plan reruns its rung's epochs from the decomposed model "
        "(default: better per unit of compute in bench_fidelity) or continues from its weights at the rung below",
        group=SEARCH,
        choices=PROMOTE,
    )
    sampler: str = option(
        "nsga2", help="Optuna sampler (default {default})", group=SEARCH, choices=tuple(SAMPLERS)
    )
    population: int | None = option(
        None, help="NSGA-II population size (default: trials/4, 4..50)", group=SEARCH
    )
    space: str | None = option(
        None,
        help="search space: a shipped name (default, resnet_cifar, vgg_cifar, torchvision_resnet) or a YAML path",
        group=SEARCH,
    )
    timeout: float | None = option(None, help="stop starting trials after this many seconds", group=SEARCH)
    seed: int = option(
        0, help="seed of the validation split, the sampler and the trials (default {default})", group=SEARCH
    )
    strategy: str = option(
        "search",
        help="search (default; warm-started from the rule-based plans), or a baseline: uniform, "
        "error-alloc (data-free error allocation), random",
        group=SEARCH,
        choices=STRATEGIES,
    )
    warm_start: bool = option(
        True,
        help="start the search from random plans instead of the uniform and error-allocation plans",
        group=SEARCH,
    )
    objective: str = option(
        "accuracy,flops",
        help="what the search trades off (default {default}); latency is measured on --target",
        group=SEARCH,
        choices=OBJECTIVES,
    )
    target: str | None = option(
        None, help="the deployment target for latency: cpu, cpu:THREADS, cuda or cuda:N", group=SEARCH
    )
    target_batch: int = option(1, help="batch size on the target (default {default})", group=SEARCH)
    target_dtype: str = option(
        "float32", help="dtype on the target (default {default})", group=SEARCH, choices=tuple(DTYPES)
    )
    target_memory_format: str | None = option(
        None,
        help="memory format of the activations on the target (default channels_last on CUDA, nchw on CPU)",
        group=SEARCH,
        choices=MEMORY_FORMATS,
    )
    target_runtime: str | None = option(
        None,
        help="the runtime latency is measured in on the target: the lookup table, the trials, the budget "
        "check and the export's timings (default onnxruntime on a CPU, where it is installed and the "
        "dtype is float32; eager PyTorch on CUDA)",
        group=SEARCH,
        choices=RUNTIMES,
    )
    front_latency_runs: int = option(
        30,
        help="without --target, time the front's members and the original side by side on this CPU after "
        "the search (batch 1, as exported), medians of this many runs (>= 10; 0 skips; default {default})",
        group=SEARCH,
    )
    # each trial
    device: str | None = option(None, help="cpu, cuda or cuda:N (default: cuda if available)", group=TRIAL)
    batch_size: int = option(128, help="fine-tuning batch size (default {default})", group=TRIAL)
    lr: float = option(0.02, help="peak fine-tuning learning rate (default {default:g})", group=TRIAL)
    compile: bool = option(False, help="torch.compile each trial's model for fine-tuning", group=TRIAL)
    cudnn_benchmark: bool = option(
        False,
        help="let cuDNN autotune every new conv shape during trials (off: each trial brings new FGA shapes)",
        group=TRIAL,
    )
    device_data_gb: float = option(
        8.0,
        help="datasets up to this size (uint8) live on the GPU; larger ones stay in pinned host memory "
        "(default {default:g})",
        group=TRIAL,
    )
    workers: int = option(
        0, help="threads decoding an ImageFolder tree on first use (default {default}: up to 8)", group=TRIAL
    )
    calibration: int = option(256, help="images for data-driven refinement (default {default})", group=TRIAL)
    recalibration: int = option(1024, help="images for BN recalibration (default {default})", group=TRIAL)
    val_fraction: float = option(
        0.1, help="validation split held out of the training data (default {default:g})", group=TRIAL
    )
    val_dir: str | None = option(
        None,
        help="validation images held out from training: an ImageFolder with train/'s classes (default: "
        "the data's val/ beside train/ and test/, else --val-fraction of the training data)",
        group=TRIAL,
    )
    val_from: str | None = option(
        None,
        help="take the validation images from: test (a stratified --val-fraction of the test split; the "
        "test figures come from the rest) or train (the training data, even with a val/ folder)",
        group=TRIAL,
        choices=VAL_FROM,
    )
    data_seed: int | None = option(
        None,
        help="seed of the validation split and of the --*-limit subsets (default: --seed), to vary the "
        "data apart from the search",
        group=TRIAL,
    )
    train_limit: int | None = option(
        None, help="use a stratified subset of this many training images", group=TRIAL
    )
    val_limit: int | None = option(
        None, help="use a stratified subset of this many validation images", group=TRIAL
    )
    test_limit: int | None = option(
        None, help="use a stratified subset of this many test images", group=TRIAL
    )
    # the Ray backend
    backend: str = option(
        "optuna", help="optuna (embedded, default) or ray (Ray Tune trials)", group=RAY, choices=BACKENDS
    )
    ray_address: str | None = option(
        None, help="join this Ray cluster (auto or HOST:PORT); implies --backend ray", group=RAY
    )
    gpus_per_trial: float | None = option(
        None,
        help="GPUs per trial; fractions such as 0.25 share a GPU (default: 1 if the cluster has GPUs)",
        group=RAY,
    )
    cpus_per_trial: float | None = option(
        None,
        help="CPUs per trial (default 1, or N with a --target cpu:N: its latency is timed on N threads)",
        group=RAY,
    )
    max_concurrent: int | None = option(
        None, help="max trials running at once (default: as resources allow)", group=RAY
    )
    storage_path: str | None = option(
        None,
        help="Ray Tune experiment storage: a path shared by all nodes (default: the run folder)",
        group=RAY,
    )
    ray_dashboard: bool = option(
        False, help="start Ray's dashboard with a local instance (off by default)", group=RAY
    )
    # storage and output
    out: str = option(
        help="run folder (default runs/MODEL-DATASET-bBUDGET); an existing one is resumed", group=STORAGE
    )
    storage: str | None = option(
        None,
        help="Optuna RDB URL for the study (default: sqlite in the run folder). The study's name does "
        "not depend on where the run folder lies, so copies of a run folder share the study in it",
        group=STORAGE,
    )
    study_name: str | None = option(
        None,
        help="study name in the storage (default: the one run.json records, made from the run's "
        "identity and a random run id when the run was created)",
        group=STORAGE,
    )
    quiet: bool = option(False, help="print only the final summary", group=STORAGE)

    def __post_init__(self) -> None:
        check(self)

    @property
    def needs_latency(self) -> bool:
        return needs_latency(self.objective, self.budget_metric)

    def latency_target(self) -> Target | None:
        """The ``--target`` with its batch, dtype and memory format (``ValueError`` if malformed),
        or None without one."""
        if self.target is None:
            return None
        from fga_search.latency import Target

        layout = None if self.target_memory_format is None else self.target_memory_format == "channels_last"
        return Target.parse(
            self.target,
            batch=self.target_batch,
            dtype=self.target_dtype,
            channels_last=layout,
            runtime=self.target_runtime,
        )

    def rung_schedule(self) -> Rungs | None:
        """The ``--rungs`` and ``--eta`` of a multi-fidelity search (``ValueError`` if malformed),
        or None for single-fidelity trials of ``epochs`` each."""
        from ._rungs import Rungs

        return None if self.rungs is None else Rungs.parse(self.rungs, eta=self.eta)

    @property
    def costs(self) -> list[str]:
        """The objective's cost columns, each minimised: flops_ratio and/or latency_ratio."""
        from fga_search.runs._pareto import objective_costs

        return objective_costs(self.objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


RunConfig.__doc__ = f"{RunConfig.__doc__}{options_doc(RunConfig)}\n"
