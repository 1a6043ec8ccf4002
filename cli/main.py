"""The ``neuro-ood`` command: parses arguments, calls a pipeline, prints its result."""

from __future__ import annotations

import json
import sys
import threading
from functools import wraps
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from neuro_ood.errors import NeuroOODError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find brain MRI scans that do not belong to a normative cohort (MSMA, Glow); "
                  "benchmark the same detectors on natural images.")
out_console = Console()
err_console = Console(stderr=True)

CacheOption = typer.Option(None, "--cache-dir", help="Preprocessed-tensor cache (default: $NEURO_OOD_CACHE "
                                                      "or ~/.cache/neuro-ood).")
ShardOption = typer.Option(None, "--shard", help="I/N: score only the I-th of N deterministic shares of the inputs "
                                                 "(numbered from 1, like SLURM_ARRAY_TASK_ID with --array=1-N).")
WorkersOption = typer.Option(None, "--workers", help="Processes preprocessing scans ahead while the network scores "
                                                     "(1: a background thread; 0: none, in turn; default: a thread "
                                                     "for slice models, in turn for whole-volume ones).")


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handles_errors(command):
    """Turn user-facing errors into one error line and exit code 2 instead of a traceback."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except NeuroOODError as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def _train(method: str | None, dataset: str | None, data_dir: Path, out: Path, config: str | None,
           overrides: list[str], resume: bool, cache_dir: Path | None) -> None:
    from neuro_ood.config import load_config
    from neuro_ood.devices import resolve_device
    from neuro_ood.errors import ConfigError
    from neuro_ood.pipelines.train import train as run_train
    from neuro_ood.trainer import distributed

    cfg = load_config(config or f"{method or 'msma'}_{dataset or 'abcd'}",
                      [*([f"dataset={dataset}"] if dataset else []), *overrides])
    if method is not None and cfg.method != method:
        raise ConfigError(f"{method} was asked for, but config {config} is a {cfg.method} config")
    # under torchrun: one process group for the run; ranks other than 0 print nothing and leave
    # after training (the block ends early for them)
    with distributed.launch(resolve_device(cfg.training.device)) as shard:
        console = err_console if shard.rank == 0 else Console(stderr=True, quiet=True)
        summary = run_train(cfg, data_dir, out, cache_dir=cache_dir, console=console, resume=resume)
        _print_train_summary(cfg, summary)


def _print_train_summary(cfg, summary) -> None:
    unit = "scans" if cfg.dataset == "abcd" else "slices"
    out_console.print(f"{summary.method} run saved to [bold]{summary.run}[/]: {summary.n_train_items} training "
                      f"{unit} ({summary.n_train_slices} {'volumes' if cfg.preprocessing.preset == 't1_volume' else 'slices'}), "
                      f"{summary.n_heldout_items} held out, "
                      + (f"{summary.steps} steps, loss {summary.final_loss:.3g}, " if summary.steps else
                         "no network (features and scorers only), ") + f"{summary.seconds:.0f} s")
    if summary.failures:
        out_console.print(f"[yellow]{len(summary.failures)} input(s) skipped[/] (listed above)")


DatasetOption = typer.Option(None, "--dataset", help="abcd: T1 scans, inliers by age; brats: tumour-free slices "
                                                     "(default: the config's, abcd without --config).")
DataDirOption = typer.Option(..., "--data-dir", help="BIDS folder, CSV/TSV table of scans, or BraTS cases.")
OutOption = typer.Option(..., "--out", help="Run directory to create (or resume).")
ConfigOption = typer.Option(None, "--config", "-c",
                            help="YAML config file or shipped name (default: <method>_<dataset>).")
SetOption = typer.Option([], "--set", help="Override a config key, e.g. training.steps=500.")
ResumeOption = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's last checkpoint.")


@app.command()
@handles_errors
def train(
    dataset: Optional[str] = DatasetOption,
    data_dir: Path = DataDirOption,
    out: Path = OutOption,
    model: Optional[str] = typer.Option(None, "--model", help="msma (default), glow, or a baseline: fanogan, "
                                                             "resnet, simple."),
    config: Optional[str] = ConfigOption,
    overrides: List[str] = SetOption,
    resume: bool = ResumeOption,
    cache_dir: Optional[Path] = CacheOption,
):
    """Train a detector (MSMA or Glow) on the inliers of a cohort and store it in a run directory."""
    _train(model, dataset, data_dir, out, config, overrides, resume, cache_dir)


baseline_app = typer.Typer(no_args_is_help=True, help="Train the f-AnoGAN, ResNet-classifier and simple baselines.")
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("fanogan")
@handles_errors
def baseline_fanogan(
    dataset: Optional[str] = DatasetOption,
    data_dir: Path = DataDirOption,
    out: Path = OutOption,
    config: Optional[str] = ConfigOption,
    overrides: List[str] = SetOption,
    resume: bool = ResumeOption,
    cache_dir: Optional[Path] = CacheOption,
):
    """f-AnoGAN (WGAN-GP + izif encoder) on the inliers only."""
    _train("fanogan", dataset, data_dir, out, config, overrides, resume, cache_dir)


@baseline_app.command("resnet")
@handles_errors
def baseline_resnet(
    dataset: Optional[str] = DatasetOption,
    data_dir: Path = DataDirOption,
    out: Path = OutOption,
    outlier_group: str = typer.Option("1", "--outlier-group", help="Group the classifier learns as outliers "
                                                                    "(an age group in years, e.g. 1)."),
    config: Optional[str] = ConfigOption,
    overrides: List[str] = SetOption,
    resume: bool = ResumeOption,
    cache_dir: Optional[Path] = CacheOption,
):
    """ResNet classifier of inliers against one outlier group (Hendrycks & Gimpel baseline)."""
    _train("resnet", dataset, data_dir, out, config, [f"resnet.outlier_group={outlier_group!r}", *overrides],
           resume, cache_dir)


@baseline_app.command("simple")
@handles_errors
def baseline_simple(
    dataset: Optional[str] = DatasetOption,
    data_dir: Path = DataDirOption,
    out: Path = OutOption,
    config: Optional[str] = ConfigOption,
    overrides: List[str] = SetOption,
    resume: bool = ResumeOption,
    cache_dir: Optional[Path] = CacheOption,
):
    """Hand-crafted intensity and morphometric features with the auxiliary scorers (GMM, k-NN); no network."""
    _train("simple", dataset, data_dir, out, config, overrides, resume, cache_dir)


@app.command()
@handles_errors
def score(
    scans: List[Path] = typer.Argument(..., help="NIfTI scans to score (BraTS runs: case folders)."),
    run: Path = typer.Option(..., "--run", help="Run directory from `neuro-ood train`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    maps: Optional[Path] = typer.Option(None, "--maps", help="Write voxel-level anomaly maps (NIfTI + PNG) "
                                                              "here (MSMA and f-AnoGAN runs)."),
    shard: Optional[str] = ShardOption,
    workers: Optional[int] = WorkersOption,
    cache_dir: Optional[Path] = CacheOption,
):
    """Score scans against a run's normative reference: score, percentile and flag per scorer."""
    from neuro_ood.pipelines.score import score_scans
    from neuro_ood.pipelines.shards import parse_shard
    from neuro_ood.report import scores_table

    if workers is not None and workers < 0:
        fail(f"--workers {workers}: needs 0 or more")
    report = score_scans(run, scans, cache_dir=cache_dir, console=err_console, maps_dir=maps,
                         shard=parse_shard(shard), workers=workers)
    if as_json:
        payload = {"scans": [r.to_dict() for r in report.results],
                   "failed": [{"path": p, "reason": r} for p, r in report.failures], "maps": report.map_files,
                   **({"shard": report.shard} if report.shard else {})}
        out_console.print_json(json.dumps(payload))
    elif report.results:
        out_console.print(scores_table(report.results))
        if report.map_files:
            out_console.print(f"anomaly maps written to {maps}")
    for path, reason in report.failures:
        err_console.print(f"[bold red]error:[/] {escape(f'{path}: {reason}')}", highlight=False, soft_wrap=True)
    if report.failures:
        raise typer.Exit(1 if report.results else 2)


@app.command()
@handles_errors
def report(
    cohort: List[Path] = typer.Argument(..., help="BIDS folder, CSV/TSV table of scans, or scan files "
                                                  "(BraTS runs: a folder of cases or case folders)."),
    runs: List[Path] = typer.Option(..., "--run", help="Run directory; repeat for several runs side by side."),
    out: Path = typer.Option(..., "--out", help="Folder for report.html, report.json, scores.csv and maps/ "
                                                "(run again to resume)."),
    workers: Optional[int] = WorkersOption,
    maps: str = typer.Option("flagged", "--maps", help="Anomaly maps as NIfTI (MSMA, f-AnoGAN): flagged, all "
                                                       "or none."),
    sample: int = typer.Option(12, "--sample", help="Unflagged scans shown as thumbnails besides the flagged."),
    show: List[str] = typer.Option([], "--show", help="Also show this scan's thumbnail (glob or part of its "
                                                      "relative path); repeatable."),
    skip_trained: bool = typer.Option(False, "--skip-trained", help="Leave out the subjects a run trained on."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: score the I-th of N shares of the cohort "
                                                              "(from 1) into OUT; `neuro-ood merge` joins the shards."),
    cache_dir: Optional[Path] = CacheOption,
):
    """Score a cohort with one or more runs into a report: report.html, scores.csv, report.json, maps."""
    from neuro_ood.pipelines.report import report as run_report
    from neuro_ood.pipelines.shards import parse_shard

    if workers is not None and workers < 0:
        fail(f"--workers {workers}: needs 0 or more")
    if sample < 0:
        fail(f"--sample {sample}: needs 0 or more")
    parsed = parse_shard(shard)
    summary = _stoppable(lambda: run_report(cohort, runs, out, cache_dir=cache_dir, console=err_console,
                                            workers=workers, maps=maps, sample=sample, show=show,
                                            skip_trained=skip_trained, shard=parsed))
    _print_report_summary(summary)


@app.command()
@handles_errors
def merge(
    shards: List[Path] = typer.Argument(..., help="The --out folders of `neuro-ood report --shard I/N`, all N."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged report.html, report.json, scores.csv, maps/."),
    sample: int = typer.Option(12, "--sample", help="Unflagged scans shown as thumbnails besides the flagged."),
    show: List[str] = typer.Option([], "--show", help="Also show this scan's thumbnail (glob or part of its "
                                                      "relative path); repeatable."),
    cache_dir: Optional[Path] = CacheOption,
):
    """Join the shards of `neuro-ood report --shard I/N` into one report, as if scored in one go."""
    from neuro_ood.pipelines.merge import merge as run_merge

    if sample < 0:
        fail(f"--sample {sample}: needs 0 or more")
    summary = _stoppable(lambda: run_merge(shards, out, cache_dir=cache_dir, console=err_console, sample=sample,
                                           show=show))
    _print_report_summary(summary)


def _stoppable(call):
    """``call()`` with a kill (SIGTERM) stopping it like Ctrl-C: temporary files removed, one line."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        return call()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _print_report_summary(summary) -> None:
    for failure in summary.failures:
        err_console.print(f"[bold red]error:[/] {escape(failure['path'] + ': ' + failure['reason'])}",
                          highlight=False, soft_wrap=True)
    counts = ", ".join(f"{label}: {c['scored']} scored, {c['reused']} reused" for label, c in summary.runs.items())
    out_console.print(f"{summary.n_scans} {summary.unit}s reported ({summary.n_flagged} flagged, {len(summary.failures)} "
                      f"failed; {counts}) in {summary.seconds:.0f} s: [bold]{escape(str(summary.html))}[/]",
                      highlight=False, soft_wrap=True)
    if summary.failures:
        raise typer.Exit(1 if summary.n_scans else 2)


@app.command()
@handles_errors
def evaluate(
    runs: List[Path] = typer.Option(..., "--run", help="Run directory; repeat to compare runs side by side."),
    data_dir: Path = typer.Option(..., "--data-dir", help="Cohort holding the outlier groups."),
    group_by: Optional[str] = typer.Option(None, "--group-by",
                                           help="Grouping: age (T1 cohorts, default), lesion (T1 cohorts with "
                                                "lesion masks: also voxel-level metrics) or tumour (BraTS, default)."),
    intersection: bool = typer.Option(False, "--intersection",
                                      help="Compare runs on the held-out subjects they share."),
    cache_dir: Optional[Path] = CacheOption,
):
    """Held-out inliers against each group (age; tumour): metric tables and RUN/metrics.json."""
    from neuro_ood.pipelines.evaluate import evaluate as run_evaluate
    from neuro_ood.report import comparison_table, localisation_table, metrics_tables

    metrics = run_evaluate(runs, data_dir, group_by=group_by, cache_dir=cache_dir, console=err_console,
                           intersection=intersection)
    if "runs" in metrics:
        out_console.print(comparison_table(metrics))
        per_slice = comparison_table(metrics, per_slice=True)
        if per_slice is not None:
            out_console.print(per_slice)
    else:
        for table in metrics_tables(metrics):
            out_console.print(table)
    located = localisation_table(metrics)
    if located is not None:
        out_console.print(located)
    out_console.print(f"metrics written to {Path(runs[0]) / 'metrics.json'}")


@app.command()
@handles_errors
def synth(
    out: Path = typer.Argument(..., help="Folder for the BIDS cohort."),
    inliers: int = typer.Option(120, "--inliers", help="Subjects aged 9-11 years."),
    ages: str = typer.Option("1,2,4,6", "--ages", help="Comma-separated outlier ages in years."),
    per_age: int = typer.Option(20, "--per-age", help="Subjects per outlier age."),
    seed: int = typer.Option(0, "--seed"),
    resolution: float = typer.Option(2.0, "--resolution", help="Voxel size in mm."),
    lesions: int = typer.Option(0, "--lesions", help="Extra subjects aged 9-11 with 1-3 synthetic lesions each "
                                                     "(masks in derivatives/lesions/)."),
    lesion_polarity: str = typer.Option("mixed", "--lesion-polarity", help="hyper, hypo or mixed (each lesion "
                                                                           "either)."),
):
    """Write a synthetic BIDS cohort of T1 scans built from the MNI152 template."""
    from neuro_ood.data.lesions import POLARITIES
    from neuro_ood.pipelines.synth import synth as run_synth

    try:
        age_list = [float(a) for a in ages.split(",") if a.strip()]
    except ValueError:
        fail(f"--ages {ages!r} is not a comma-separated list of numbers")
    if lesions < 0:
        fail(f"--lesions must be 0 or more, got {lesions}")
    if lesion_polarity not in POLARITIES:
        fail(f"--lesion-polarity must be one of {', '.join(POLARITIES)}, got {lesion_polarity!r}")
    path = run_synth(out, inliers, age_list, per_age, seed=seed, resolution_mm=resolution, console=err_console,
                     lesions=lesions, lesion_polarity=lesion_polarity)
    with_lesions = f" ({lesions} with lesions)" if lesions else ""
    out_console.print(f"wrote {inliers + per_age * len(age_list) + lesions} scans{with_lesions} to {path}")


@app.command()
@handles_errors
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", help="Folder for the cohort, run(s) and cache."),
    config: str = typer.Option("msma_quick", "--config", "-c", help="YAML config file or shipped name."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key of the MSMA config (data.* and "
                                                          "preprocessing.* keys: of the baselines' too)."),
    with_baselines: bool = typer.Option(False, "--with-baselines",
                                        help="Also train f-AnoGAN and the ResNet classifier; compare side by side."),
):
    """Synthesise a cohort, train MSMA at CPU size and the simple baseline, evaluate by age side by side, print
    the table, write a report."""
    from neuro_ood.pipelines.quickstart import quickstart as run_quickstart
    from neuro_ood.report import comparison_table, metrics_tables

    metrics = run_quickstart(out, config=config, overrides=overrides, console=err_console,
                             baselines=with_baselines)
    tables = [comparison_table(metrics)] if "runs" in metrics else metrics_tables(metrics)
    for table in tables:
        out_console.print(table)
    out_console.print(f"done in {metrics['seconds'] / 60:.1f} min; runs and metrics.json in {out}")
    out_console.print(f"report of the held-out and outlier scans: [bold]{escape(metrics['report'])}[/]",
                      highlight=False, soft_wrap=True)


@app.command()
@handles_errors
def benchmark(
    in_set: Optional[str] = typer.Option(None, "--in", help="In-distribution set (default: the built-in china "
                                                            "crops against flower, constant, digits, gaussian)."),
    out_sets: List[str] = typer.Option([], "--out", help="Out-of-distribution set(s): cifar10, cifar100, svhn, "
                                                          "mnist, fashion-mnist, folder:P, mix:a+b, or a built-in."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the downloaded sets."),
    model: str = typer.Option("all", "--model", help="msma, glow, fanogan, resnet (the S9 classifier, needs --general), "
                                                     "simple or all."),
    general: Optional[str] = typer.Option(None, "--general", help="General-domain set for the likelihood ratio "
                                                                  "and the outlier loss."),
    configs: List[str] = typer.Option([], "--config", "-c", help="Config per method (default: *_bench_quick)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a config key of every method's config."),
    run_dir: Path = typer.Option(Path("benchmark"), "--run-dir", help="Where models and benchmark.json go."),
):
    """MSMA, Glow and the baselines side by side on natural-image dataset pairs (offline built-in default)."""
    from neuro_ood.pipelines.benchmark import benchmark as run_benchmark
    from neuro_ood.report import benchmark_tables, bpd_table

    report = run_benchmark(in_set, out_sets, data_root, model, general, configs, run_dir, err_console, overrides)
    for table in benchmark_tables(report):
        out_console.print(table)
    if report["bpd"]:
        out_console.print(bpd_table(report))
    out_console.print(f"done in {report['seconds'] / 60:.1f} min; {Path(run_dir) / 'benchmark.json'}")


analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of trained models.")
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("fourier")
@handles_errors
def analyze_fourier(
    run: Path = typer.Option(..., "--run", help="A Glow run (e.g. BENCH/<in>/glow)."),
    dataset: str = typer.Option(..., "--dataset", help="Images to mix (test split)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root"),
    n: int = typer.Option(500, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed"),
    figure: Optional[Path] = typer.Option(None, "--figure", help="PNG of example mixes."),
):
    """Amplitude/phase mixing (S3): Spearman correlation of mixed-image likelihoods with each source."""
    from neuro_ood.pipelines.analyze import fourier

    summary = fourier(run, dataset, data_root, n, seed, figure, err_console)
    out_console.print(f"{summary['n']} mixes of {dataset}: Spearman with amplitude source "
                      f"{summary['spearman_amplitude']:.3f}, with phase source {summary['spearman_phase']:.3f}")
    if figure is not None:
        out_console.print(f"examples drawn to {figure}")


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
