"""``dleaf``: the command line.  It parses options into an image source, a model and a run's
settings, calls the package, and prints; it holds no analysis logic.

One vocabulary on every command where it applies: ``--model DIR`` (default: the embedded model),
``--device cpu|cuda|cuda:N|mps|auto``, ``--dtype fp32|bf16|fp16`` (the model's), ``--seed``,
``--limit N`` (N >= 1), ``--batch-size N`` (N >= 1), ``--out DIR``, ``--json``, ``--config FILE``
(a method config), ``--tuned FILE`` (tuned settings; ``--tuned-any`` to accept another model's),
``--answer-parser``, and one image source: ``--split`` | ``--coco-images [--coco-annotations]
[--image-ids]`` | ``--images-jsonl``, with ``--shard i/N``.  Options are checked before a model
loads.  Expected failures print one line and exit with code 2; ``dleaf --debug CMD`` shows the
traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from dleaf_analysis import __version__
from dleaf_analysis.errors import DleafError

console = Console(stderr=True, soft_wrap=True)
EXPECTED_ERRORS = (DleafError, OSError, ValueError)
_STATE = {"debug": os.environ.get("DLEAF_DEBUG", "") not in ("", "0")}


class _ErrorBoundary(TyperGroup):
    """Runs a command; an expected failure becomes ``error: <message>`` and exit code 2."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="IProgress not found")
                return super().invoke(ctx)
        except EXPECTED_ERRORS as e:
            if _STATE["debug"]:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            console.print(f"[bold red]error:[/] {escape(msg)}  [dim](dleaf --debug ... for the traceback)[/]")
            raise typer.Exit(2)


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, cls=_ErrorBoundary,
                  pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dleaf-analysis {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of expected failures"),
) -> None:
    if debug:
        _STATE["debug"] = True


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(2)


# -- the shared vocabulary: each option has one meaning and is validated before any model loads ----

DTYPES = ("fp32", "bf16", "fp16")
PARSERS = ("official", "negation", "substring", "first-token")


def _check_device(value: str) -> str:
    import torch

    v = value.strip().lower()
    if v in ("cpu", "auto"):
        return v
    if v == "cuda" or v.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{value!r}: no CUDA device is visible here; use --device cpu")
        if ":" in v:
            i = v.split(":", 1)[1]
            if not i.isdigit() or int(i) >= torch.cuda.device_count():
                raise typer.BadParameter(f"{value!r}: {torch.cuda.device_count()} CUDA device(s) visible")
        return v
    if v == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise typer.BadParameter("'mps': no Apple GPU is visible here; use --device cpu")
        return v
    raise typer.BadParameter(f"{value!r}; choose cpu, cuda, cuda:N, mps or auto")


def _check_dtype(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in DTYPES:
        raise typer.BadParameter(f"{value!r}; choose one of {', '.join(DTYPES)}")
    return value


def _check_parser(value: str) -> str:
    if value not in PARSERS:
        raise typer.BadParameter(f"{value!r}; choose one of {', '.join(PARSERS)}")
    return value


def _check_file(value: Optional[Path]) -> Optional[Path]:
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"{value}: no such file")
    return value


def _check_shard(value: Optional[str]) -> Optional[str]:
    if value is not None:
        from dleaf_analysis.sources import parse_shard

        try:
            parse_shard(value)
        except DleafError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def ModelOpt():  # noqa: N802
    return typer.Option(None, "--model", help="model directory (default: the embedded model)")


def DeviceOpt():  # noqa: N802
    return typer.Option("cpu", "--device", callback=_check_device, help="cpu | cuda | cuda:N | mps | auto")


def DtypeOpt():  # noqa: N802
    return typer.Option(None, "--dtype", callback=_check_dtype, help="the model's dtype: fp32 | bf16 | fp16")


def LimitOpt(default: Optional[int] = None, help: str = "the first N images only"):  # noqa: N802
    return typer.Option(default, "--limit", min=1, help=help)


def BatchOpt(default: Optional[int]):  # noqa: N802
    return typer.Option(default, "--batch-size", min=1, help="items (or intervened copies) per forward pass")


def SeedOpt():  # noqa: N802
    return typer.Option(0, "--seed", help="seed of every random choice of the run")


def JsonOpt():  # noqa: N802
    return typer.Option(False, "--json", help="print the result as JSON on stdout")


def ConfigOpt():  # noqa: N802
    return typer.Option(None, "--config", callback=_check_file,
                        help="JSON file of method settings, e.g. {\"method\": \"dleaf\", \"gamma\": 0.5}")


def ParserOpt():  # noqa: N802
    return typer.Option("official", "--answer-parser", callback=_check_parser,
                        help="POPE answer parser: " + " | ".join(PARSERS))


def SplitOpt():  # noqa: N802
    return typer.Option(None, "--split", help="a scene-world split (the embedded model's images): dev | confirm | "
                                              "test | test-partner-absent | replication")


def CocoImagesOpt():  # noqa: N802
    return typer.Option(None, "--coco-images", help="COCO images folder (e.g. the unpacked val2014/)")


def CocoAnnotationsOpt():  # noqa: N802
    return typer.Option(None, "--coco-annotations", help="COCO 2014 instances JSON with segmentations "
                                                         "(e.g. annotations/instances_val2014.json)")


def ImageIdsOpt(help: str = "text file of COCO image ids (default: every image of the annotations)"):  # noqa: N802
    return typer.Option(None, "--image-ids", help=help)


def ImagesJsonlOpt():  # noqa: N802
    return typer.Option(None, "--images-jsonl", help='your annotated images: JSON Lines of {"image": PATH, '
                                                      '"objects": [NAME | {"name", "box" | "mask"}]}')


def ShardOpt(help: str = "i/N: this process takes every N-th item from i (merge the shards' --out directories); "  # noqa: N802
                         "slurm-array: the shard of this Slurm array job"):
    return typer.Option(None, "--shard", callback=_check_shard, help=help)


def FillOpt():  # noqa: N802
    return typer.Option("blur", "--fill", help="how a removed object is filled in counterfactual photos: blur | mean")


def TunedOpt():  # noqa: N802
    return typer.Option(None, "--tuned", callback=_check_file,
                        help="tuned settings (the tuned_methods.json `dleaf tune` writes); refused if tuned for "
                             "another model unless --tuned-any")


def TunedAnyOpt():  # noqa: N802
    return typer.Option(False, "--tuned-any", help="accept a --tuned file of another model (its settings are then "
                                                   "not used: the methods run at their defaults, with a warning)")


def _table(df, title: str) -> Table:
    """A rich table that wraps long cells instead of truncating them; floats to 3 significant places."""
    t = Table(title=title, expand=False)
    for c in df.columns:
        t.add_column(str(c), overflow="fold")
    for _, r in df.iterrows():
        t.add_row(*[("n/a" if v != v else f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}")
                    if isinstance(v, float) else str(v) for v in r])
    return t


def _print_table(df, title: str) -> None:
    Console(width=max(120, Console().width), soft_wrap=False).print(_table(df, title))


def _ci_warning(n: int, what: str = "items") -> None:
    if n < 10:
        console.print(f"[yellow]warning:[/] the confidence intervals rest on {n} {what} (fewer than 10): read them as "
                      "indications, not estimates")


def _emit_json(obj) -> None:
    from dleaf_analysis.tables import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), indent=1, default=str) + "\n")


def _load(model: Optional[Path], device: str = "cpu", dtype: Optional[str] = None):
    from dleaf_analysis.distributed import device_for
    from dleaf_analysis.models.loading import load_model

    device = device_for(device)  # under torchrun / srun: this rank's GPU
    if device == "auto":  # larger than one device: accelerate places the layers
        return load_model(model, dtype=dtype, device_map="auto")
    return load_model(model, device=device, dtype=dtype)


def _source(split, coco_images, coco_annotations, image_ids, images_jsonl, fill="blur", default_split="dev",
            limit=None, shard=None, require_annotations=True):
    from dleaf_analysis.sources import from_options

    return from_options(split, coco_images, coco_annotations, image_ids, images_jsonl, fill, default_split, limit,
                        shard, require_annotations)


def _method_config(method: str, config: Optional[Path]) -> tuple[str, dict | None]:
    from dleaf_analysis.interventions import get_method, load_config

    method_config = None
    if config is not None:
        method_config = load_config(config)
        file_method = method_config.pop("method", method)
        if file_method != method and method != "greedy":
            _fail(f"--method {method} but the config file is for {file_method!r}")
        method = file_method
    get_method(method, method_config)  # names and types checked before a model loads
    return method, method_config


def _show_eval(res, as_json: bool, title: str, out: Optional[Path]) -> None:
    if as_json:
        sys.stdout.write(res.to_json() + "\n")
        return
    _print_table(res.summary.drop(columns=["benchmark"]), title)
    n = int(res.summary["n"].min()) if "n" in res.summary else len(res.details)
    _ci_warning(n, "images")
    console.print(f"[dim]protocol: {escape(res.protocol.describe())}[/]")
    if res.interventions is not None and len(res.interventions):
        console.print(f"[dim]the method fired {len(res.interventions)} times[/]")
    if out:
        console.print(f"results written to {out}")


# -- commands -----------------------------------------------------------------------------------------


@app.command()
def evaluate(
    benchmark: str = typer.Option("chair", help="chair | pope"),
    split: Optional[str] = SplitOpt(),
    coco_images: Optional[Path] = CocoImagesOpt(),
    coco_annotations: Optional[Path] = CocoAnnotationsOpt(),
    image_ids: Optional[Path] = ImageIdsOpt(),
    images_jsonl: Optional[Path] = ImagesJsonlOpt(),
    method: str = typer.Option("greedy", help="greedy | dleaf | uniform | pai | vcd | ablate | probe"),
    config: Optional[Path] = ConfigOpt(),
    tuned: Optional[Path] = TunedOpt(),
    tuned_any: bool = TunedAnyOpt(),
    limit: Optional[int] = LimitOpt(help="evaluate the first N images only"),
    shard: Optional[str] = ShardOpt(),
    model: Optional[Path] = ModelOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    batch_size: int = BatchOpt(32),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="default: the source's"),
    seed: int = SeedOpt(),
    answer_parser: str = ParserOpt(),
    out: Optional[Path] = typer.Option(None, help="write protocol.json, summary.csv, details.jsonl here (resumable)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the results of another run in --out"),
    as_json: bool = JsonOpt(),
) -> None:
    """Evaluate a method with CHAIR or POPE on any image source (bootstrap 95% CIs; resumable with --out)."""
    from dleaf_analysis.evaluation.runner import BENCHMARKS, evaluate as run

    if benchmark not in BENCHMARKS:
        _fail(f"unknown benchmark {benchmark!r}; choose one of {list(BENCHMARKS)}")
    method, method_config = _method_config(method, config)
    src = _source(split, coco_images, coco_annotations, image_ids, images_jsonl, default_split="test", limit=limit,
                  shard=shard, require_annotations=False)
    lm = _load(model, device, dtype)
    res = run(benchmark, src, lm, method=method, method_config=method_config, seed=seed, batch_size=batch_size,
              max_new_tokens=max_new_tokens, answer_parser=answer_parser, out_dir=out, progress=not as_json,
              overwrite=overwrite, tuned_file=tuned, tuned_any=tuned_any)
    _show_eval(res, as_json, f"{benchmark.upper()} · {src!r} · {method}", out)


@app.command("pope-coco")
def pope_coco(
    coco_images: Path = typer.Option(..., help="folder with COCO val2014 images (COCO_val2014_*.jpg)"),
    variant: str = typer.Option("adversarial", help="random | popular | adversarial"),
    pope_version: str = typer.Option("current", "--pope-version",
                                     help="current (RUCAIBox/POPE) | opera (the snapshot OPERA used)"),
    questions: Optional[Path] = typer.Option(None, callback=_check_file, help="a POPE question file instead"),
    method: str = typer.Option("greedy"),
    config: Optional[Path] = ConfigOpt(),
    tuned: Optional[Path] = TunedOpt(),
    tuned_any: bool = TunedAnyOpt(),
    answer_parser: str = ParserOpt(),
    limit: Optional[int] = LimitOpt(help="the first N images of the question file only"),
    shard: Optional[str] = ShardOpt("i/N: this process takes every N-th image from i"),
    out: Path = typer.Option(Path("runs/pope-coco"), help="resumable results directory"),
    model: Optional[Path] = ModelOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    batch_size: int = BatchOpt(8),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
) -> None:
    """POPE on COCO with POPE's own question files (``dleaf evaluate --benchmark pope`` on their images)."""
    from dleaf_analysis.evaluation.runner import evaluate as run
    from dleaf_analysis.sources import CocoSource, parse_shard

    if variant not in ("random", "popular", "adversarial"):
        _fail(f"unknown POPE variant {variant!r}; choose random, popular or adversarial")
    method, method_config = _method_config(method, config)
    src = CocoSource.from_pope(coco_images, variant, pope_version, questions).limit(limit)
    i, n = parse_shard(shard)
    src = src.shard(i, n) if n > 1 else src
    if src.parent.missing:
        console.print(f"[yellow]{len(src.parent.missing)} question images are not in {coco_images}: skipped[/]")
    lm = _load(model, device, dtype)
    res = run("pope", src, lm, method=method, method_config=method_config, seed=seed, batch_size=batch_size,
              answer_parser=answer_parser, pope_variants=(variant,), max_new_tokens=8, out_dir=out,
              progress=not as_json, tuned_file=tuned, tuned_any=tuned_any)
    _show_eval(res, as_json, f"POPE {variant} ({pope_version}) · {method}", out)


@app.command("caption-coco")
def caption_coco(
    coco_images: Path = typer.Option(..., help="folder with COCO val2014 images"),
    image_ids: Path = typer.Option(..., callback=_check_file,
                                   help="a captions file (its image ids are used) or a text file of ids"),
    coco_annotations: Optional[Path] = CocoAnnotationsOpt(),
    method: str = typer.Option("greedy"),
    config: Optional[Path] = ConfigOpt(),
    tuned: Optional[Path] = TunedOpt(),
    tuned_any: bool = TunedAnyOpt(),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    limit: Optional[int] = LimitOpt(help="the first N images only"),
    shard: Optional[str] = ShardOpt(),
    out: Path = typer.Option(Path("runs/captions-coco"), help="resumable results directory"),
    model: Optional[Path] = ModelOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    batch_size: int = BatchOpt(4),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
) -> None:
    """Caption COCO images and score CHAIR (``dleaf evaluate --benchmark chair`` on a COCO source)."""
    from dleaf_analysis.evaluation.runner import evaluate as run

    method, method_config = _method_config(method, config)
    src = _source(None, coco_images, coco_annotations, image_ids, None, limit=limit, shard=shard,
                  require_annotations=False)
    lm = _load(model, device, dtype)
    res = run("chair", src, lm, method=method, method_config=method_config, seed=seed, batch_size=batch_size,
              max_new_tokens=max_new_tokens, out_dir=out, progress=not as_json, tuned_file=tuned, tuned_any=tuned_any)
    res.details.rename(columns={"item": "image_id"})[["image_id", "caption"]].to_json(
        out / "captions.jsonl", orient="records", lines=True)
    _show_eval(res, as_json, f"CHAIR (COCO) · {method}", out)


@app.command("merge-shards")
def merge_shards(
    dirs: list[Path] = typer.Argument(..., help="the --out directories of the shards of one evaluation"),
    out: Optional[Path] = typer.Option(None, help="write the merged evaluation here"),
    as_json: bool = JsonOpt(),
) -> None:
    """Merge the shard directories of one evaluation (evaluate, pope-coco, caption-coco) and score it."""
    from dleaf_analysis.evaluation.runner import merge_evaluations

    res = merge_evaluations(dirs, out)
    _show_eval(res, as_json, f"{len(dirs)} shards merged", out)


def _image_arg(image: Optional[str], split: str, index: int):
    """An image from a user's file (``--image``) or from a split (``--split``, ``--index``)."""
    from dleaf_analysis.models.inputs import as_pil
    from dleaf_analysis.scenes import load_split

    if image:
        return as_pil(image)
    sp = load_split(split, limit=index + 1)
    if index >= len(sp):
        _fail(f"split {split!r} has {len(sp)} images; --index {index} is out of range")
    return sp.image(index)


def _default_prompt() -> str:
    from dleaf_analysis.models.generation import DEFAULT_CAPTION_PROMPT

    return DEFAULT_CAPTION_PROMPT


@app.command()
def trace(
    image: Optional[str] = typer.Option(None, help="an image file (PNG/JPEG); default: an image of --split"),
    split: str = typer.Option("dev"),
    index: int = typer.Option(0, min=0, help="image index in the split"),
    prompt: Optional[str] = typer.Option(None, help="default: the embedded model's caption prompt"),
    max_new_tokens: int = typer.Option(144, "--max-new-tokens", min=1),
    backend: str = typer.Option("nnsight", help="nnsight | hooks"),
    model: Optional[Path] = ModelOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    out: Path = typer.Option(Path("runs/trace"), help="cache directory to write"),
    cache_dtype: str = typer.Option("fp32", "--cache-dtype", help="storage of the cache: fp32 | fp16"),
) -> None:
    """Trace greedy generation on one image; write the attention cache."""
    from dleaf_analysis.tracing import trace_generation

    if backend not in ("nnsight", "hooks"):
        _fail(f"unknown backend {backend!r}; choose nnsight or hooks")
    if cache_dtype not in ("fp32", "fp16"):
        _fail(f"unknown --cache-dtype {cache_dtype!r}; choose fp32 or fp16")
    img = _image_arg(image, split, index)
    lm = _load(model, device, dtype)
    cache = trace_generation(lm, img, prompt or _default_prompt(), max_new_tokens=max_new_tokens, backend=backend,
                             stream_to=out, dtype=cache_dtype)
    console.print(f"{cache}\ngenerated: {cache.text()}\ncache written to {out}")


@app.command()
def diagnose(
    image: Optional[str] = typer.Option(None, help="an image file; default: an image of --split"),
    split: str = typer.Option("dev"),
    index: int = typer.Option(0),
    prompt: Optional[str] = typer.Option(None, help="default: the embedded model's caption prompt"),
    cache: Optional[Path] = typer.Option(None, help="diagnose a saved cache instead of tracing"),
    model: Optional[Path] = ModelOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    out: Optional[Path] = typer.Option(None, help="write diagnostics.csv (layer detectors) and heads.csv here"),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
) -> None:
    """LIAE per layer per step, IAF per head and every registered layer detector for one image."""
    from dleaf_analysis import detectors
    from dleaf_analysis.cache import AttentionCache
    from dleaf_analysis.tracing import trace_generation

    if cache is not None:
        c = AttentionCache.load(cache)
    else:
        c = trace_generation(_load(model, device, dtype), _image_arg(image, split, index), prompt or _default_prompt(),
                             max_new_tokens=144)
    table = detectors.diagnose(c, seed=seed)
    heads = c.to_frame()
    if out:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "diagnostics.csv", index=False)
        heads.to_csv(out / "heads.csv", index=False)
    if as_json:
        _emit_json(table.to_dict(orient="records"))
        return
    liae = c.liae_frame().pivot(index=["step", "token"], columns="layer", values="liae").reset_index()
    liae.columns = [str(x) if not isinstance(x, int) else f"L{x}" for x in liae.columns]
    _print_table(liae, f"LIAE (mean-map) per step and layer: {c.text()}")


def _options(option: Optional[list[str]]) -> dict:
    out = {}
    for o in option or []:
        if "=" not in o:
            _fail(f"--option takes KEY=VALUE (a JSON value), got {o!r}")
        k, v = o.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@app.command()
def study(
    name: str = typer.Argument(..., help="a registered study: ablation | patching | localization | dpo | calibration | "
                                         "leverage | trigger | oracle"),
    split: Optional[str] = SplitOpt(),
    coco_images: Optional[Path] = CocoImagesOpt(),
    coco_annotations: Optional[Path] = CocoAnnotationsOpt(),
    image_ids: Optional[Path] = ImageIdsOpt(),
    images_jsonl: Optional[Path] = ImagesJsonlOpt(),
    fill: str = FillOpt(),
    limit: Optional[int] = LimitOpt(100, help="first N images of the source"),
    shard: Optional[str] = ShardOpt("i/N: this process takes every N-th image from i (calibration, leverage: every "
                                    "N-th unit); merge the shards' --out directories with --merge"),
    out: Path = typer.Option(Path("runs/studies"), help="results go to OUT/<study>/ (resumable)"),
    model: Optional[Path] = ModelOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="at most N intervened copies per forward (default: all heads of a "
                                                  "layer, or all layers, at once); bounds memory on large models"),
    event_token: str = typer.Option("first", "--event-token", help="first | span (see docs/method.md)"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="a study setting KEY=VALUE (JSON value; "
                                                                      "repeatable), e.g. strength=0.5"),
    tuned: Optional[Path] = TunedOpt(),
    tuned_any: bool = TunedAnyOpt(),
    merge: Optional[list[Path]] = typer.Option(None, "--merge", help="merge these shard --out directories into "
                                                                     "--out instead of running (repeatable)"),
    max_units: Optional[int] = typer.Option(None, "--max-units", min=1, help="only the first N units (events, "
                                                                             "images, faults): a budget"),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
) -> None:
    """Run a registered study on the scene world (--split), COCO (--coco-images, --coco-annotations) or your
    annotated images (--images-jsonl); resumable (re-run to continue after a crash)."""
    from dleaf_analysis.studies import STUDIES, NoEventsError, merge_study, run_study
    from dleaf_analysis.studies.events import EVENT_TOKENS

    if name not in STUDIES:
        _fail(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    if event_token not in EVENT_TOKENS:
        _fail(f"unknown --event-token {event_token!r}; choose one of {list(EVENT_TOKENS)}")
    opts = _options(option)
    STUDIES[name].options(opts)  # unknown settings refused before anything loads
    if merge:
        res = merge_study(name, merge, out)
    else:
        src = _source(split, coco_images, coco_annotations, image_ids, images_jsonl, fill, limit=limit, shard=shard)
        lm = _load(model, device, dtype)
        try:
            res = run_study(name, src, limit=None, out=out, lm=lm, seed=seed, progress=not as_json, log=console.print,
                            batch_size=batch_size, event_token=event_token, tuned_file=tuned, tuned_any=tuned_any,
                            options=opts, max_units=max_units)
        except NoEventsError as e:
            console.print(f"[yellow]{escape(str(e))}[/]")
            if as_json:
                _emit_json({"study": name, "n_events": 0, "message": str(e)})
            raise typer.Exit(0)
    if as_json:
        sys.stdout.write(res.to_json() + "\n")
        return
    for k, t in res.tables.items():
        if k.endswith("summary") and len(t):
            _print_table(t, f"{name}: {k}")
    n = res.summary.get("n_with_preferred", res.summary.get("n_images"))
    if isinstance(n, int):
        _ci_warning(n, "events" if STUDIES[name].uses_events else "images")
    for k, v in res.summary.items():
        if not isinstance(v, (dict, list)):
            console.print(f"{k}: {v}")
        elif k == "verdict":
            for line in v:
                console.print(f"- {escape(str(line))}")
    console.print(f"results in {out / name}")


@app.command()
def tune(
    out: Path = typer.Option(Path("runs/tuning"), help="sweep directory (resumable); tuned_methods.json goes here"),
    limit: Optional[int] = LimitOpt(help="first N tuning images"),
    max_recall_drop: float = typer.Option(3.0, min=0.0, help="selection rule: recall may fall at most this much"),
    ship: bool = typer.Option(False, help="also write the shipped settings to data/tuned_methods.json and data/tuning/ "
                                          "(the embedded model, in a checkout)"),
    model: Optional[Path] = ModelOpt(),
    split: Optional[str] = SplitOpt(),
    coco_images: Optional[Path] = CocoImagesOpt(),
    coco_annotations: Optional[Path] = CocoAnnotationsOpt(),
    image_ids: Optional[Path] = ImageIdsOpt("the held-out COCO image ids to tune on"),
    confirm_image_ids: Optional[Path] = typer.Option(None, "--confirm-image-ids", callback=_check_file,
                                                     help="held-out COCO image ids to confirm the choice on"),
    eval_image_ids: Optional[Path] = typer.Option(None, "--eval-image-ids", callback=_check_file,
                                                  help="the evaluation image ids: tuning refuses to share any of them"),
    images_jsonl: Optional[Path] = ImagesJsonlOpt(),
    shard: Optional[str] = typer.Option(None, "--shard", help="not supported: tuning selects on every image at once"),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    batch_size: int = BatchOpt(32),
    seed: int = SeedOpt(),
) -> None:
    """Tuning study (same budget per method) with confirmation on separate images, and D-LEAF's
    sensitivity curves: on the embedded model's dev split (confirmed on `confirm`), or on held-out
    images of a real checkpoint (COCO or an annotated folder)."""
    import shutil

    from dleaf_analysis.evaluation.tuning import tune as run
    from dleaf_analysis.paths import IN_CHECKOUT
    from dleaf_analysis.settings import TUNED_FILE
    from dleaf_analysis.sources import CocoSource

    if shard:
        _fail("tuning compares every configuration on the same images and cannot be sharded; give a smaller held-out "
              "--image-ids list instead")
    src = _source(split, coco_images, coco_annotations, image_ids, images_jsonl, default_split="dev", limit=limit)
    scene = src.record().get("kind") == "scene"
    if scene and src.record().get("split") != "dev":
        _fail("tuning on the scene world uses the dev split (confirm and test are for confirmation and evaluation)")
    if (eval_image_ids or confirm_image_ids) and src.kind != "coco":
        _fail("--eval-image-ids and --confirm-image-ids apply to a COCO source")
    exclude = CocoSource(coco_images, coco_annotations, eval_image_ids) if eval_image_ids else None
    confirm = CocoSource(coco_images, coco_annotations, confirm_image_ids) if confirm_image_ids else None
    if ship and (not scene or model is not None):
        _fail("--ship writes the shipped settings of the embedded model; for other models use the tuned_methods.json "
              f"in {out} (--tuned)")
    if ship and not IN_CHECKOUT:
        _fail("--ship writes into the package's data; it works in a checkout of the repository (here, use the "
              f"tuned_methods.json in {out} with --tuned)")
    lm = _load(model, device, dtype)
    res = run(out, lm=lm, max_recall_drop=max_recall_drop, seed=seed, log=console.print, source=src,
              confirm=confirm, exclude=exclude, batch_size=batch_size)
    _print_table(res["grid"].drop(columns=["key"], errors="ignore"), "tuning grid")
    if len(res["confirmation"]):
        _print_table(res["confirmation"], "confirmation of each choice")
    console.print(f"tuned settings: {out / 'tuned_methods.json'} (pass it with --tuned)")
    if ship:
        shutil.copy(out / "chosen.json", TUNED_FILE)
        dest = TUNED_FILE.parent / "tuning"
        dest.mkdir(exist_ok=True)
        for f in ("grid.csv", "confirmation.csv", "sensitivity.csv"):
            shutil.copy(out / f, dest / f)
        console.print(f"tuned settings written to {TUNED_FILE}")


@app.command("chair-score")
def chair_score(
    captions: Path = typer.Option(..., help="captions file: JSON Lines (or JSON) with image ids and captions"),
    gt: Optional[Path] = typer.Option(None, help="ground truth {image_id: [objects]} (default: COCO 2014, data/coco)"),
    tagger: str = typer.Option("perceptron", help="perceptron | none (every token lemmatised as a noun)"),
    image_id_key: str = typer.Option("image_id"),
    caption_key: str = typer.Option("caption"),
    out: Optional[Path] = typer.Option(None, help="write per-caption details (jsonl) here"),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
) -> None:
    """CHAIR of a COCO captions file (faithful to the script used by OPERA / PAI), with bootstrap CIs."""
    from dleaf_analysis.evaluation.coco_chair import CocoChair, chair_score as score, read_captions

    scorer = CocoChair.load(gt, tagger=tagger)
    summary, details = score(read_captions(captions, image_id_key, caption_key), scorer, seed=seed)
    if out:
        details.to_json(out, orient="records", lines=True)
    skipped = {k: v for k, v in summary.attrs.items() if k.startswith("skipped")}
    if as_json:
        _emit_json({"summary": summary.to_dict(orient="records"), **summary.attrs})
        return
    _print_table(summary, f"CHAIR (COCO) · {captions.name} · tagger {tagger}")
    _ci_warning(len(details), "captions")
    console.print(f"hallucinated/mentions: {summary.attrs['hallucinated_mentions']}/{summary.attrs['mentions']}; "
                  f"skipped: {skipped}")


@app.command("make-splits")
def make_splits(
    out: Optional[Path] = typer.Option(None, help="where the manifests go (default: the checkout's data/splits)"),
) -> None:
    """Re-freeze the split manifests (after changing the world spec)."""
    from dleaf_analysis.paths import IN_CHECKOUT
    from dleaf_analysis.scenes import write_manifests

    if out is None and not IN_CHECKOUT:
        _fail("make-splits writes into the package's data in a checkout; here, give --out DIR")
    for name, m in write_manifests(out_dir=out).items():
        console.print(f"{name}: {m['size']} scenes, content {m['content_hash']}")


@app.command("train-model")
def train_model(
    out: Optional[Path] = typer.Option(None, help="output directory (default: the checkout's data/embedded-llava)"),
    seed: int = SeedOpt(),
    vision_steps: Optional[int] = typer.Option(None, min=0),
    text_steps: Optional[int] = typer.Option(None, min=0, help="stage 2: language-model steps on the descriptions as text"),
    full_steps: Optional[int] = typer.Option(None, min=0),
    weight_decay: Optional[float] = typer.Option(None, min=0.0, help="AdamW weight decay of every stage"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (weights are bitwise reproducible for a "
                                                            "fixed count)"),
    text_format: Optional[str] = typer.Option(None, help="stage 2 text: plain (description after BOS) | chat (inside "
                                                         "the chat template without the image)"),
    card: bool = typer.Option(True, help="evaluate the model card after training"),
    card_limit: Optional[int] = typer.Option(None, min=1, help="evaluate the card on the first N images of each split"),
    as_json: bool = JsonOpt(),
) -> None:
    """Train the embedded model from the world spec and a seed; write weights and model card.

    Resumable: checkpoints go to OUT/checkpoints after every stage and every few hundred steps;
    the same command started again continues where a killed run stopped, to the same weights."""
    from dataclasses import replace

    from dleaf_analysis.model_card import finalize_card
    from dleaf_analysis.models.training import TrainConfig, save_embedded, train_embedded
    from dleaf_analysis.paths import EMBEDDED_MODEL_DIR, IN_CHECKOUT

    if out is None and not IN_CHECKOUT:
        _fail("train-model writes the embedded model into the package's data in a checkout; here, give --out DIR")
    out = out or EMBEDDED_MODEL_DIR
    overrides = {"vision_steps": vision_steps, "text_steps": text_steps, "full_steps": full_steps,
                 "weight_decay": weight_decay, "threads": threads, "text_format": text_format}
    cfg = replace(TrainConfig(seed=seed), **{k: v for k, v in overrides.items() if v is not None})
    model, processor, history = train_embedded(cfg, log=console.print, checkpoint_dir=Path(out) / "checkpoints")
    save_embedded(model, processor, out, {"train": cfg.to_dict(), "history": history})
    console.print(f"model written to {out} ({history['wall_time_s']} s of training)")
    if card:
        result = finalize_card(out, limit=card_limit, progress=not as_json)
        if as_json:
            _emit_json(result["metrics"])
        console.print(f"card: {out / 'MODEL_CARD.md'}")


@app.command()
def info(model: Optional[Path] = ModelOpt(), device: str = DeviceOpt(), dtype: Optional[str] = DtypeOpt()) -> None:
    """Show the model, its provenance and the frozen splits."""
    from dleaf_analysis.models.adapters import ModelAdapter
    from dleaf_analysis.scenes import SPLITS

    lm = _load(model, device, dtype)
    ad = ModelAdapter(lm.model)
    r = lm.record()
    console.print(f"dleaf-analysis {__version__}; model {lm.model_id} at {lm.path} (weights {r['weights_hash']}, files "
                  f"{r['files_hash']}); {type(lm.model).__name__}, {ad.n_layers} layers x {ad.n_heads} heads")
    for name, d in SPLITS.items():
        console.print(f"split {name}: seed {d.seed}, {d.size} scenes ({d.kind})")


@app.command("check-device")
def check_device(
    model: Optional[Path] = ModelOpt(),
    device: str = typer.Option("cuda", "--device", callback=_check_device,
                               help="the device to check: cuda | cuda:N | mps | auto | cpu"),
    dtype: Optional[str] = DtypeOpt(),
    n_tokens: int = typer.Option(8, "--tokens", min=1, help="tokens to decode"),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
) -> None:
    """First run on a new machine: greedy and D-LEAF on DEVICE against a float32 CPU run of the same
    model and inputs (logits, tokens, D-LEAF's firings) with per-token times.  Exit code 1 if they disagree."""
    from dleaf_analysis.device_check import check_device as run

    rep = run(model, device=device, dtype=dtype, n_tokens=n_tokens, seed=seed)
    if as_json:
        _emit_json(rep.to_dict())
    else:
        import pandas as pd

        _print_table(pd.DataFrame([{k: v for k, v in rep.to_dict().items() if k != "problems"}]).T.reset_index()
                     .rename(columns={"index": "check", 0: "value"}), f"check-device: {rep.device} {rep.dtype}")
        for p in rep.problems:
            console.print(f"[bold red]problem:[/] {escape(p)}")
        console.print("[green]all checks passed[/]" if rep.ok else "[red]the device run disagrees with the CPU run[/]")
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def figures(
    only: Optional[list[str]] = typer.Option(None, help="render only these figures (repeatable)"),
    results: Path = typer.Option(Path("results"), help="the results directory of `dleaf reproduce`"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: figures/)"),
    n_images: int = typer.Option(100, min=1, help="images traced by figures that trace the model"),
    model: Optional[Path] = ModelOpt(),
    coco_images: Optional[Path] = CocoImagesOpt(),
    coco_annotations: Optional[Path] = CocoAnnotationsOpt(),
    image_ids: Optional[Path] = ImageIdsOpt("COCO image ids of the worked examples (default: the results' "
                                            "test_images.txt)"),
    images_jsonl: Optional[Path] = ImagesJsonlOpt(),
    tuned: Optional[Path] = TunedOpt(),
    tuned_any: bool = TunedAnyOpt(),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    seed: int = SeedOpt(),
) -> None:
    """Regenerate the figures (PNG, PDF, the CSV behind each, manifest.json); figures whose inputs are
    absent are skipped with the reason."""
    from dleaf_analysis.figures import FIGURES, FigureContext, render_all
    from dleaf_analysis.paths import FIGURES_DIR

    unknown = [n for n in (only or []) if n not in FIGURES]
    if unknown:
        _fail(f"unknown figure(s) {unknown}; choose from {sorted(FIGURES)}")
    if image_ids is None and coco_images is not None and (results / "test_images.txt").is_file():
        image_ids = results / "test_images.txt"  # the worked examples: the run's evaluation images
    src = _source(None, coco_images, coco_annotations, image_ids, images_jsonl, default_split=None)
    if tuned is None and (results / "tuning" / "tuned_methods.json").is_file():
        tuned = results / "tuning" / "tuned_methods.json"
    lm = _load(model, device, dtype) if (model is not None or device != "cpu" or dtype) else None  # lazily otherwise
    if lm is not None and src is None:  # figures that trace the model do so on scene images
        from dleaf_analysis.sources import SceneSource

        SceneSource.load("dev", limit=1).check_model(lm)  # a SourceError: one line naming --coco-images, exit 2
    entries = render_all(FigureContext(results=results, lm=lm, n_images=n_images, seed=seed, source=src,
                                       tuned_file=tuned), out or FIGURES_DIR, only=only, log=console.print)
    console.print(f"{len(entries)} figures written to {out or FIGURES_DIR}")


@app.command()
def reproduce(
    quick: bool = typer.Option(False, "--quick", help="smoke-size run (used in CI)"),
    out: Path = typer.Option(Path("results"), help="where results and the report go"),
    model: Optional[Path] = ModelOpt(),
    coco_images: Optional[Path] = CocoImagesOpt(),
    coco_annotations: Optional[Path] = CocoAnnotationsOpt(),
    image_ids: Optional[Path] = ImageIdsOpt(),
    images_jsonl: Optional[Path] = ImagesJsonlOpt(),
    fill: str = FillOpt(),
    limit: Optional[int] = LimitOpt(help="the first N images of the source (real checkpoints), or of each pool "
                                         "(test, replication) on the scene world"),
    study_limit: Optional[int] = typer.Option(None, "--study-limit", min=1,
                                              help="images of each study (default 300; --quick: 8)"),
    pope_limit: int = typer.Option(500, "--pope-limit", min=1, help="scene world: POPE on the first N images of "
                                                                    "each pool"),
    tuned: Optional[Path] = TunedOpt(),
    tuned_any: bool = TunedAnyOpt(),
    tune_fraction: float = typer.Option(0.25, "--tune-fraction", min=0.01, max=0.99,
                                        help="share of the images held out for tuning (real checkpoints without --tuned)"),
    shard: Optional[str] = ShardOpt("i/N: only every N-th evaluation image from i (needs --tuned); merge the studies "
                                    "with `dleaf study NAME --merge`"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="at most N intervened copies per "
                                                                                "forward in the studies"),
    device: str = DeviceOpt(),
    dtype: Optional[str] = DtypeOpt(),
    seed: int = SeedOpt(),
    as_json: bool = JsonOpt(),
    update_readme: bool = typer.Option(False, "--update-readme",
                                       help="also write RESULTS.md, the README's findings and figures/ (used when "
                                            "regenerating the committed results)"),
) -> None:
    """The main job: evaluate the methods (with validity, the truncation baseline and replication on
    fresh images), run the studies, and write a markdown report and figures into OUT -- on the embedded
    model's scene world (default), or on a real checkpoint (--model) with COCO or your annotated images."""
    from dleaf_analysis.paths import FIGURES_DIR, IN_CHECKOUT
    from dleaf_analysis.report import reproduce as run

    src = _source(None, coco_images, coco_annotations, image_ids, images_jsonl, fill, default_split=None, limit=limit)
    if src is None and (shard or tuned):
        _fail("--shard and --tuned apply to a real checkpoint with an image source (--coco-images ... or "
              "--images-jsonl)")
    if update_readme and (src is not None or not IN_CHECKOUT):
        _fail("--update-readme writes the embedded model's committed results in a checkout; elsewhere the report is "
              "OUT/report.md")
    if shard and not tuned:
        _fail("--shard needs --tuned: every shard must run the same settings")
    lm = _load(model, device, dtype)
    summary = run(out, lm=lm, source=src, quick=quick, seed=seed, progress=not as_json, log=console.print,
                  update_readme=update_readme, figures_dir=FIGURES_DIR if update_readme else out / "figures",
                  tuned_file=tuned, tuned_any=tuned_any, tune_fraction=tune_fraction, shard=shard,
                  batch_size=batch_size, study_limit=study_limit, pool_limit=limit if src is None else None,
                  pope_limit=pope_limit)
    if as_json:
        _emit_json(summary.to_dict(orient="records"))
    else:
        _print_table(summary, "reproduce: summary")
        console.print(f"report: {out / 'report.md'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
