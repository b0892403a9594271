"""The ``onnxopt`` command line (click). Imports stay light: torch loads only inside the passes that need it.

Exit codes: 0 done, 1 a budget was missed (the report says which), 2 bad input or usage (a message, never a
traceback), 3 an internal error (a bug: please report it; ``ONNXOPT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from onnxopt import __version__
from onnxopt.errors import BadInputError, OnnxoptError

EXIT_OK, EXIT_BUDGET_MISSED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``NAME:D0,D1,...`` -> {NAME: (D0, D1, ...)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise BadInputError(f"--input-shape '{item}' must look like NAME:D0,D1,... (e.g. input:1,3,224,224)")
        try:
            values = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise BadInputError(f"--input-shape '{item}': dims must be integers") from None
        if not values or any(v <= 0 for v in values):
            raise BadInputError(f"--input-shape '{item}': dims must be positive integers")
        shapes[name] = values
    return shapes


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BadInputError(f"{option} '{text}' must be a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise BadInputError(f"{option} '{text}' must list positive integers")
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="onnxopt")
def cli() -> None:
    """Make a trained ONNX network small and fast after training."""


def _round_to(value: str | int) -> str | int:
    """--round-to: 'auto' or a positive integer."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise click.BadParameter(f"expected auto or an integer >= 1, got {value!r}", param_hint="'--round-to'")
    return number


def _run_options(command: Any) -> Any:
    """Options shared by the commands that run a recipe (optimize, quantize)."""
    options = [
        click.option("--preprocess", type=click.Path(dir_okay=False), help="Image preprocessing spec (YAML/JSON)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
                     help="Fix a dynamic input's shape (repeatable)."),
        click.option("--budget", "budgets", multiple=True, metavar="NAME=VALUE",
                     help="A budget to meet, e.g. accuracy_drop=0.01, latency_ratio=0.9 (repeatable). Missed: exit 1."),
        click.option("--report", type=click.Path(dir_okay=False),
                     help="Report JSON path (Markdown and PNG are written beside it). Default: OUTPUT.report.json."),
        click.option("--seed", type=int, default=None, help="Seed for everything random (default 0)."),
        click.option("--threads", type=int, default=None, help="ORT intra-op threads for measurements (default: ORT's)."),
        click.option("--no-latency", is_flag=True, help="Skip latency measurement."),
        click.option("--no-plot", is_flag=True,
                     help="Write the report's JSON and Markdown without its PNG plot (matplotlib: about 1 s)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars (for CI logs)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# --------------------------------------------------------------------------------------------------------- optimize
@cli.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the optimized model.")
@click.option("--example", is_flag=True, help="Use the small example model (and its data) that ships with onnxopt.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe file (YAML or TOML) naming passes and parameters.")
@click.option("-p", "--pass", "passes", multiple=True, metavar="NAME[:K=V,...]",
              help="A pass to run (repeatable, in order); replaces the recipe's passes.")
@click.option("--calib", help="Calibration data: .npz, folder of .npy, folder of images, or random[:N].")
@click.option("--eval", "eval_", help="Evaluation data (labels as 'y' in .npz or folder-per-class images).")
@_run_options
@click.option("--provider", default="cpu", show_default=True, help="ORT execution provider: cpu, cuda, tensorrt.")
@click.option("--max-eval-samples", type=int, default=2000, show_default=True,
              help="Evaluation samples used for fidelity and accuracy.")
@click.option("--target", type=click.Choice(["latency", "size"]), default=None,
              help="Keep the fastest (or smallest) stage meeting every budget. Default with --calib and no recipe: "
                   "latency (normalize -> prune -> distill -> quantize); else the last pass's model as before.")
@click.option("--search", is_flag=True, help="Also vary pass parameters; writes the Pareto front (REPORT.pareto.*).")
@click.option("--max-candidates", type=click.IntRange(min=1), default=8, show_default=True,
              help="Recipes --search tries at most.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Pass-result cache (default $ONNXOPT_CACHE_DIR or ~/.cache/onnxopt).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the pass-result cache.")
def optimize(model: str | None, output: str | None, example: bool, recipe: str | None, passes: tuple[str, ...],
             calib: str | None, eval_: str | None, preprocess: str | None, input_shapes: tuple[str, ...],
             budgets: tuple[str, ...], report: str | None, seed: int | None, threads: int | None, provider: str,
             no_latency: bool, no_plot: bool, max_eval_samples: int, quiet: bool, target: str | None, search: bool,
             max_candidates: int, cache_dir: str | None, no_cache: bool) -> None:
    """Run a recipe over MODEL, validate after every pass, write OUTPUT and a report."""
    from onnxopt.api import optimize as run_optimize
    from onnxopt.pipeline.recipe import Recipe

    if example:
        from onnxopt import examples

        if model:
            raise BadInputError("give either MODEL or --example, not both")
        model = str(examples.default_model_path())
        calib = calib or str(examples.default_calib_path())
        eval_ = eval_ or str(examples.default_eval_path())
    if not model:
        raise click.UsageError("missing MODEL (or --example)")
    if not output:
        raise click.UsageError("missing -o/--output")
    plan: Any = recipe
    if passes:
        cli_recipe = Recipe.from_cli(passes)
        if recipe:
            file_recipe = Recipe.from_file(recipe)
            cli_recipe.seed, cli_recipe.input_shapes, cli_recipe.budgets = (
                file_recipe.seed, file_recipe.input_shapes, file_recipe.budgets)
        plan = cli_recipe
    if example and plan is None:
        from onnxopt.pipeline.search import example_recipe

        plan = example_recipe()  # quick and torch-free; the full recipe on the example: --pass flags (README)
    if target is None and (plan is None or example) and calib:
        target = "latency"  # the end-to-end default recipe: keep the fastest stage that meets the budgets
    if not no_cache and cache_dir is None:
        from onnxopt.pipeline.cache import default_cache_dir

        cache_dir = str(default_cache_dir())
    result = run_optimize(
        model, plan, calib, eval_, input_shapes=parse_input_shapes(input_shapes), budgets=list(budgets),
        seed=seed, output=output, report=report, preprocess=preprocess, threads=threads, provider=provider,
        measure_latency=not no_latency, plot=not no_plot, max_eval_samples=max_eval_samples, quiet=quiet, target=target,
        search=search, max_candidates=max_candidates, cache_dir=None if no_cache else cache_dir,
    )
    _finish(result)


def _finish(result: Any) -> None:
    """Print the summary; a missed budget exits 1 (the model and the report are written all the same)."""
    _print_summary(result.report.to_dict(), result.output_path, result.report_paths)
    if not result.passed:
        raise SystemExit(EXIT_BUDGET_MISSED)


def _print_summary(report: dict[str, Any], output: Path | None, report_paths: Sequence[Path]) -> None:
    steps = report["steps"]
    first, last = steps[0]["metrics"], steps[-1]["metrics"]
    parts = [f"size {first['size_bytes'] / 1e6:.3f} -> {last['size_bytes'] / 1e6:.3f} MB"]
    comparison = report.get("latency_comparison") or {}
    if "speedup" in comparison:
        parts.append(f"latency {comparison['input_median_ms']:.3f} -> {comparison['output_median_ms']:.3f} ms "
                     f"({comparison['speedup']:.2f}x, round-robin)")
    elif first.get("latency") and last.get("latency"):
        speedup = first["latency"]["median_ms"] / last["latency"]["median_ms"]
        parts.append(f"latency {first['latency']['median_ms']:.3f} -> {last['latency']['median_ms']:.3f} ms "
                     f"({speedup:.2f}x)")
    if last.get("accuracy") is not None and first.get("accuracy") is not None:
        parts.append(f"accuracy {first['accuracy']:.2%} -> {last['accuracy']:.2%}")
    fidelity = steps[-1].get("fidelity_vs_original") or {}
    if fidelity.get("max_rel_error") is not None:
        parts.append(f"max rel err vs input {_fmt(fidelity['max_rel_error'])}")
    click.echo("; ".join(parts))
    for verdict in report["budgets"]:
        sign = "<=" if verdict["direction"] == "max" else ">="
        measured = "n/a" if verdict["measured"] is None else f"{verdict['measured']:.4g}"
        click.echo(f"budget {verdict['name']}: {measured} {sign} {verdict['limit']:g} "
                   f"{'met' if verdict['passed'] else 'MISSED'}{' (' + verdict['note'] + ')' if verdict['note'] else ''}")
    if output:
        click.echo(f"wrote {output}")
    for path in report_paths:
        click.echo(f"wrote {path}")


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


# ------------------------------------------------------------------------------------------------------------ bench
@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--batch", "batch_sizes", default="1", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--threads", default="1", show_default=True, help="Intra-op thread counts, comma-separated.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model and setting.")
@click.option("--repeats", type=int, default=50, show_default=True, help="Timed runs per model and setting.")
@click.option("--provider", default="cpu", show_default=True, help="ORT execution provider: cpu, cuda, tensorrt.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="Shape for inputs with dynamic dims other than the batch (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--spinning", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="ORT intra-op threads spin between runs; auto: only when one model is timed (interleaved "
                   "spinning sessions slow each other down).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the JSON to this file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def bench(models: tuple[str, ...], batch_sizes: str, threads: str, warmup: int, repeats: int, provider: str,
          input_shapes: tuple[str, ...], seed: int, spinning: str, as_json: bool, output: str | None,
          quiet: bool) -> None:
    """Measure ONNX Runtime latency of MODELS, interleaved round-robin so their ratios come from one run."""
    from onnxopt.bench import BenchConfig, benchmark
    from onnxopt.modelio import atomic_write_text, load_model

    if warmup < 0 or repeats < 1:
        raise BadInputError("--warmup must be >= 0 and --repeats >= 1")
    loaded = [load_model(path) for path in models]
    config = BenchConfig(batch_sizes=_int_list(batch_sizes, "--batch"), threads=_int_list(threads, "--threads"),
                         warmup=warmup, repeats=repeats, provider=provider,
                         input_shapes=parse_input_shapes(input_shapes), seed=seed,
                         spinning={"auto": None, "on": True, "off": False}[spinning])
    labels = _unique_labels(models)
    result = benchmark(loaded, config, labels=labels, progress=not quiet)
    text = json.dumps(result.to_dict(), indent=2)
    if output:
        atomic_write_text(output, text + "\n")
    click.echo(text if as_json else result.format_table())


def _unique_labels(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


# ---------------------------------------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="Shapes for dynamic inputs (for MAC counting).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model: str, input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Ops, parameters, MACs, shapes, and what the passes would do to MODEL (which is not changed)."""
    from onnxopt.inspect_model import format_inspection, inspect_model
    from onnxopt.modelio import load_model

    info = inspect_model(load_model(model), parse_input_shapes(input_shapes))
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


# ----------------------------------------------------------------------------------------------------------- passes
@cli.command("passes")
def list_passes() -> None:
    """List the passes a recipe can name, with their parameters and defaults."""
    import dataclasses

    from onnxopt.pipeline import registry

    for name in registry.available():
        cls = registry.get(name)
        click.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        for field in dataclasses.fields(cls):
            if field.init:
                if field.default is not dataclasses.MISSING:
                    shown = repr(field.default)
                elif field.default_factory is not dataclasses.MISSING:
                    shown = repr(field.default_factory())
                else:
                    shown = "(required)"
                click.echo(f"    {field.name} = {shown}")


# --------------------------------------------------------------------------------------------------------- quantize
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the int8 model.")
@click.option("--calib", required=True, help="Calibration data: .npz, folder of .npy, folder of images, or random[:N].")
@click.option("--eval", "eval_", help="Evaluation data (labels as 'y' in .npz or folder-per-class images).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from the calibration statistics.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--format", "format_", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True,
              help="QuantizeLinear/DequantizeLinear pairs, or QLinear* operators.")
@click.option("--reduce-range", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="7-bit weights; auto: on for x86 CPUs without VNNI (u8s8 saturation).")
@click.option("--calib-samples", type=int, default=256, show_default=True, help="Calibration samples used at most.")
@click.option("--weight-method", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
              help="Weight ranges: min/max, or per-channel MSE-optimal clipping.")
@click.option("--equalize", is_flag=True, help="Cross-layer equalization of Conv->[Relu]->Conv pairs first.")
@click.option("--bias-correction", is_flag=True, help="Remove the mean output shift of int8 weights from the biases.")
@click.option("--placement", type=click.Choice(["auto", "all"]), default="auto", show_default=True,
              help="auto: int8 only where it is faster than FP32 on this CPU and passes the checks (timed); "
                   "all: quantize everything, untimed.")
@click.option("--mixed-fallback/--no-mixed-fallback", default=True, show_default=True,
              help="With placement auto: when every faster int8 candidate fails its check, keep the fewest most "
                   "sensitive layers FP32 that let one pass.")
@click.option("--profile-split/--no-profile-split", default=True, show_default=True,
              help="With placement auto: also time the convs ORT's profiler finds slower in int8 kept FP32.")
@_run_options
def quantize(model: str, output: str, calib: str, eval_: str | None, method: str, per_channel: bool, format_: str,
             reduce_range: str, calib_samples: int, weight_method: str, equalize: bool, bias_correction: bool,
             placement: str, mixed_fallback: bool, profile_split: bool, preprocess: str | None,
             input_shapes: tuple[str, ...],
             budgets: tuple[str, ...], report: str | None, seed: int | None, threads: int | None, no_latency: bool,
             no_plot: bool,
             quiet: bool) -> None:
    """Int8 static quantization of MODEL (normalize, then quantize), validated and reported like optimize."""
    from onnxopt.api import optimize as run_optimize
    from onnxopt.passes import NormalizePass
    from onnxopt.passes.quantize.pass_ import QuantizePass

    try:
        step = QuantizePass(method=method, per_channel=per_channel, format=format_,  # type: ignore[arg-type]
                            reduce_range=reduce_range, calib_samples=calib_samples,  # type: ignore[arg-type]
                            weight_method=weight_method, equalize=equalize,  # type: ignore[arg-type]
                            bias_correction=bias_correction, placement=placement,  # type: ignore[arg-type]
                            mixed_fallback=mixed_fallback, profile_split=profile_split)
    except ValueError as exc:
        raise BadInputError(f"quantize: {exc}") from None
    result = run_optimize(
        model, [NormalizePass(), step], calib, eval_, input_shapes=parse_input_shapes(input_shapes),
        budgets=list(budgets), seed=seed, output=output, report=report, preprocess=preprocess, threads=threads,
        measure_latency=not no_latency, plot=not no_plot, quiet=quiet,
    )
    _finish(result)


# ---------------------------------------------------------------------------------------------------------- distill
@cli.command()
@click.argument("student", type=click.Path(dir_okay=False))
@click.option("--teacher", required=True, type=click.Path(dir_okay=False), help="Teacher ONNX model.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the student.")
@click.option("--data", required=True, help="Training data (.npz with optional labels 'y', folder, ...).")
@click.option("--eval", "eval_", help="Evaluation data: early stopping and the kept epoch.")
@click.option("--unlabelled", help="Extra training data without labels, learnt from the teacher only.")
@click.option("--method", default="kd", show_default=True,
              help="kd, dkd, dist, ofa, fitnet, fsp, at, a combination such as kd+at, or none (no teacher).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Samples per step; a student or teacher that fixes its batch size trains in batches of that size.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd", show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True)
@click.option("--temperature", type=float, default=4.0, show_default=True)
@click.option("--alpha", type=float, default=0.9, show_default=True, help="(1-alpha) CE + alpha distillation.")
@click.option("--patience", type=int, default=0, show_default=True, help="Early stopping patience (0 = off).")
@click.option("--clip-grad-norm", type=float, default=0.0, show_default=True,
              help="Rescale gradients to this global L2 norm at most before each step (0 = off).")
@click.option("--select-on", type=click.Choice(["eval", "holdout", "last"]), default="eval", show_default=True,
              help="What picks the kept epoch: --eval data, a held-out slice of --data (keeps --eval unseen), "
                   "or the last epoch.")
@click.option("--holdout-fraction", type=float, default=0.1, show_default=True,
              help="Share of --data held out with --select-on holdout.")
@click.option("--augment", default="none", show_default=True, help="shift[:PIXELS], flip[:P], shift+flip, none.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--teacher-runtime", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--max-samples", type=int, default=None, help="Training samples used at most.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), help="Save last.pt/best.pt here each epoch.")
@click.option("--resume", is_flag=True, help="Continue from CHECKPOINT_DIR/last.pt.")
@click.option("--qat", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Quantization-aware fine-tuning (auto: when the student has Q/DQ nodes).")
@click.option("--stochastic-rounding", is_flag=True, help="QAT: stochastic rounding in training.")
@_run_options
def distill(student: str, teacher: str, output: str, data: str, eval_: str | None, unlabelled: str | None,
            method: str, epochs: int, lr: float, batch_size: int, optimizer: str, schedule: str, temperature: float,
            alpha: float, patience: int, clip_grad_norm: float, select_on: str, holdout_fraction: float, augment: str,
            device: str, teacher_runtime: str, max_samples: int | None,
            checkpoint_dir: str | None, resume: bool, qat: str, stochastic_rounding: bool, preprocess: str | None,
            input_shapes: tuple[str, ...], budgets: tuple[str, ...], report: str | None, seed: int | None,
            threads: int | None, no_latency: bool, no_plot: bool, quiet: bool) -> None:
    """Fine-tune STUDENT against TEACHER on DATA and write the trained weights into STUDENT's own graph."""
    from onnxopt.passes.distill.api import distill as run_distill

    try:
        result = run_distill(
            student, teacher, data, eval_, output=output, report=report, budgets=list(budgets), seed=seed,
            preprocess=preprocess, threads=threads, input_shapes=parse_input_shapes(input_shapes),
            measure_latency=not no_latency, plot=not no_plot, quiet=quiet, unlabelled=unlabelled, method=method,
            epochs=epochs, lr=lr,
            batch_size=batch_size, optimizer=optimizer, schedule=schedule, temperature=temperature, alpha=alpha,
            patience=patience, clip_grad_norm=clip_grad_norm, select_on=select_on,
            holdout_fraction=holdout_fraction, augment=augment,
            device=device, teacher_runtime=teacher_runtime, max_samples=max_samples,
            checkpoint_dir=checkpoint_dir, resume=resume, qat=qat, stochastic_rounding=stochastic_rounding)
    except ValueError as exc:
        raise BadInputError(f"distill: {exc}") from None
    if result.output_path is not None:
        _finish(result)


# ------------------------------------------------------------------------------------------------------------ prune
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the pruned model.")
@click.option("--ratio", type=float, default=None, help="Fraction of the prunable channels removed (0-1).")
@click.option("--macs-ratio", type=float, default=None, help="Fraction of the MACs removed (0.5 = 2x fewer; default).")
@click.option("--latency-ratio", type=float, default=None,
              help="Fraction of the measured ORT latency (batch 1) removed; candidates are timed.")
@click.option("--criterion", type=click.Choice(["l1", "l2", "bn_scale", "taylor"]), default="l1", show_default=True,
              help="Channel importance; taylor needs --calib, bn_scale keeps BatchNormalization unfolded.")
@click.option("--allocation", type=click.Choice(["global", "uniform"]), default="global", show_default=True)
@click.option("--round-to", default="auto", show_default=True, callback=lambda _c, _p, v: _round_to(v),
              help="Round kept channel counts to a multiple of this; auto: ORT's conv channel block on this CPU "
                   "(16 with AVX-512, else 8); 1 = off.")
@click.option("--depth", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Fraction of removable blocks (residual branches, same-shape layers) removed first, least "
                   "important (measured on --calib, else random inputs) first.")
@click.option("--keep-batchnorm/--fold-batchnorm", default=False, show_default=True,
              help="Keep BatchNormalization in the pruned model (for a distill pass that follows: recovery works "
                   "far better with BN; fold it afterwards with normalize). bn_scale always keeps it.")
@click.option("--protect", multiple=True, metavar="NODE", help="Node left whole (repeatable).")
@click.option("--calib", help="Calibration data (taylor criterion, depth importance): .npz, folder of .npy, images, or random[:N].")
@click.option("--eval", "eval_", help="Evaluation data (labels as 'y' in .npz or folder-per-class images).")
@_run_options
def prune(model: str, output: str, ratio: float | None, macs_ratio: float | None, latency_ratio: float | None,
          criterion: str, allocation: str, round_to: int, depth: float, keep_batchnorm: bool,
          protect: tuple[str, ...], calib: str | None, eval_: str | None, preprocess: str | None, input_shapes: tuple[str, ...], budgets: tuple[str, ...],
          report: str | None, seed: int | None, threads: int | None, no_latency: bool, no_plot: bool,
          quiet: bool) -> None:
    """Structured channel pruning of MODEL (normalize, then prune), validated and reported like optimize."""
    from onnxopt.api import optimize as run_optimize
    from onnxopt.passes import NormalizePass
    from onnxopt.passes.prune.pass_ import PrunePass

    try:
        step = PrunePass(ratio=ratio, macs_ratio=macs_ratio, latency_ratio=latency_ratio, criterion=criterion,
                         allocation=allocation, round_to=round_to, protect=list(protect), depth=depth)
    except ValueError as exc:
        raise BadInputError(f"prune: {exc}") from None
    result = run_optimize(
        model, [NormalizePass(fold_batchnorm=criterion != "bn_scale" and not keep_batchnorm), step], calib, eval_,
        input_shapes=parse_input_shapes(input_shapes), budgets=list(budgets), seed=seed, output=output,
        report=report, preprocess=preprocess, threads=threads, measure_latency=not no_latency, plot=not no_plot,
        quiet=quiet,
    )
    _finish(result)


# -------------------------------------------------------------------------------------------------------------- main
_INTERRUPTED = False


def _interrupted() -> int:
    global _INTERRUPTED
    _INTERRUPTED = True
    click.echo("error: interrupted; no output was written", err=True)
    return EXIT_BAD_INPUT


def run() -> None:
    """The process entry point (console script and ``python -m onnxopt``): exit with :func:`main`'s code.

    After Ctrl-C the process leaves at once with exit code 2: every ``finally`` (atomic writes, temporary folders)
    has run by then, and interpreter shutdown with torch loaded sometimes ended the process by SIGINT instead
    (exit status -2, seen in about 1 of 3 interrupted distillation runs under pytest).

    First, the command replays itself once with malloc asking for transparent huge pages where that helps
    (:mod:`onnxopt.hugepages`)."""
    if _launched_as_cli():
        from onnxopt.hugepages import relaunch

        relaunch()
    code = main()
    if _INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _launched_as_cli() -> bool:
    """True in a process started as the CLI (the console script, ``python -m onnxopt``), never in one that only
    calls :func:`run` from its own code: that one is not ours to restart."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == "onnxopt.__main__":
        return True
    return Path(sys.argv[0]).stem == "onnxopt" if sys.argv and sys.argv[0] else False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI and turn every error into a message and an exit code."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="onnxopt", standalone_mode=False)
    except click.exceptions.Abort:
        return _interrupted()
    except click.ClickException as exc:
        exc.show()
        return EXIT_BAD_INPUT
    except OnnxoptError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:
        return int(exc.code or 0)
    except MemoryError:
        click.echo("error: out of memory", err=True)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line instead of a traceback
        if os.environ.get("ONNXOPT_DEBUG"):
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc} (set ONNXOPT_DEBUG=1 for the traceback; "
                   "please report it)", err=True)
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
