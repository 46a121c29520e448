"""The `enrich` command: run the worker, publish events, migrate, train, show, demo."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from schemas.settings import REPO_ROOT, get_settings
from worker.errors import DeadLetterKind

if TYPE_CHECKING:
    import pydantic


class _Cli(typer.Typer):
    """The `enrich` app: a fault the user fixes with a setting is told in one line that names
    the setting, with exit code 2, instead of a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            message = _fixable(exc)
            if message is None:
                raise
            typer.echo(f"enrich: {message}", err=True)
            sys.exit(2)


def _fixable(exc: Exception) -> str | None:
    """What to tell about a fault of the settings or the servers they name; None otherwise.

    A server library's fault can only come from a library that was imported, and a command
    that needs no server may run where those libraries are not installed (`enrich bench
    stages` on a GPU machine): their exception classes are looked up, not imported.
    """
    import pydantic
    from pydantic_settings import SettingsError

    from handlers.base import ModelLoadError
    from worker.errors import TransientFault

    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    server_fault = _server_fault(exc, first_line)
    if server_fault is not None:
        return server_fault
    if isinstance(exc, TransientFault):
        return first_line
    if isinstance(exc, ModelLoadError):
        return f"cannot load the models: {first_line}"
    if isinstance(exc, SettingsError):
        return _unreadable_setting(first_line)
    if isinstance(exc, pydantic.ValidationError) and exc.title == "Settings":
        return _invalid_setting(exc)
    return None


def _server_fault(exc: Exception, first_line: str) -> str | None:
    """A fault of the database or the broker, told by the setting that names the server."""
    psycopg = sys.modules.get("psycopg")
    amqp_exceptions = sys.modules.get("amqp.exceptions")
    kombu_exceptions = sys.modules.get("kombu.exceptions")
    local = sys.modules.get("worker.local")

    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        if exc.sqlstate or "FATAL:" in first_line:
            return f"the database at ENRICH_DATABASE_URL refused the connection: {first_line}"
        return f"the database at ENRICH_DATABASE_URL does not answer: {first_line}"
    is_programming_error = psycopg is not None and isinstance(exc, psycopg.ProgrammingError)
    if is_programming_error and "connection" in str(exc):
        return f"ENRICH_DATABASE_URL is not a Postgres URL: {first_line}"
    if amqp_exceptions is not None and isinstance(exc, amqp_exceptions.AccessRefused):
        return f"the broker refused the user in ENRICH_BROKER_URL: {first_line}"
    if kombu_exceptions is not None and isinstance(exc, kombu_exceptions.OperationalError):
        return f"the broker at ENRICH_BROKER_URL does not answer: {first_line}"
    if isinstance(exc, ConnectionError):
        return f"the broker at ENRICH_BROKER_URL does not answer: {first_line}"
    if local is not None and isinstance(exc, local.BrokerUnreachable):
        return first_line
    return None


def _invalid_setting(exc: pydantic.ValidationError) -> str:
    """The first setting pydantic refused: its variable, the value received, what is allowed."""
    from worker.errors import preview

    error = exc.errors(include_url=False)[0]
    path = [str(part) for part in error["loc"] if isinstance(part, str)]
    name = "ENRICH_" + "__".join(path).upper()
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and "ENRICH_" in message:
        return f"settings do not fit together: {message}"
    return f"{name} received {preview(error['input'])}; allowed: {message}"


def _unreadable_setting(first_line: str) -> str:
    """pydantic-settings names only the group (`batch`) of a variable that is not JSON; name
    the variables of that group that are."""
    import re

    found = re.search(r'field "(\w+)"', first_line)
    culprits = _lists_not_json(found.group(1)) if found else []
    return (
        f"a setting cannot be read: {', '.join(culprits) or first_line} (list settings take "
        """JSON, e.g. ENRICH_IMAGES__HTTPS_HOSTS='["images.shop.example"]')"""
    )


def _lists_not_json(group: str) -> list[str]:
    """`NAME='value'` of each set ENRICH_{GROUP}__* variable whose setting is a list or a
    mapping and whose value is not JSON."""
    import json
    import typing

    from pydantic import BaseModel

    from schemas.settings import Settings

    field = Settings.model_fields.get(group)
    model = None if field is None else field.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    prefix = f"ENRICH_{group.upper()}__"
    structured = {
        prefix + name.upper()
        for name, nested in model.model_fields.items()
        if typing.get_origin(nested.annotation) in (list, dict)
    }

    def is_json(value: str) -> bool:
        try:
            json.loads(value)
        except ValueError:
            return False
        return True

    return [
        f"{name}={value!r}"
        for name, value in sorted(os.environ.items())
        if name in structured and not is_json(value)
    ]


app = _Cli(
    help="Catalog enrichment worker: masks, labels and embeddings for product events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    help="Train the demo models on ../shared/datasets/ccp.", no_args_is_help=True
)
app.add_typer(train_app, name="train")
dlq_app = typer.Typer(help="Inspect and replay the dead-letter queue.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
bench_app = typer.Typer(help="Benchmarks: the worker (`enrich bench`) and similarity queries.")
app.add_typer(bench_app, name="bench")

DEFAULT_CCP = REPO_ROOT.parent / "shared" / "datasets" / "ccp"


class AutocastDtype(StrEnum):
    """torch dtypes `enrich bench precision --cpu-dtype` autocasts to."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


DatasetsFolder = Annotated[
    Path,
    typer.Option(
        "--data",
        exists=True,
        file_okay=False,
        help="The shared datasets folder, holding ccp/ and clothing-small/.",
    ),
]
CcpFolder = Annotated[
    Path, typer.Option("--data", exists=True, file_okay=False, help="The CCP dataset folder.")
]


def _setup_logging() -> None:
    from worker.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


@app.command()
def worker(
    concurrency: Annotated[
        int,
        typer.Option(
            help="Pool processes, each with its models; with --pool threads, task threads "
            "that share one copy and batch across events (docs/sizing.md)."
        ),
    ] = 1,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork, solo or threads.")] = "prefork",
    loglevel: Annotated[str, typer.Option(help="Celery's log level.")] = "INFO",
    hostname: Annotated[
        str | None,
        typer.Option(help="Node name; unset gives enrich-PID@HOST, unique on a shared broker."),
    ] = None,
) -> None:
    """Consume product-created events and enrich each product."""
    _setup_logging()  # before torch and the models' libraries load and warn
    from worker.app import app as celery_app
    from worker.models import missing_model_folders

    missing = missing_model_folders(get_settings().models)
    if missing:
        typer.echo(f"cannot start: model folders missing: {', '.join(missing)}", err=True)
        raise typer.Exit(2)

    celery_app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            f"--hostname={hostname or f'enrich-{os.getpid()}@%h'}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="JSON lines, one event per line; - for stdin.")],
) -> None:
    """Publish events to the catalog exchange as a producer service would."""
    from kombu import Connection

    from worker.events import publish_events

    _setup_logging()
    settings = get_settings()
    if str(file) != "-" and not file.is_file():
        typer.echo(f"no such file: {file}", err=True)
        raise typer.Exit(2)
    lines = sys.stdin if str(file) == "-" else file.read_text().splitlines()
    with Connection(
        settings.broker_url.get_secret_value(), transport_options={"confirm_publish": True}
    ) as connection:
        count = publish_events(connection, settings, lines)
    typer.echo(f"published {count} events to exchange {settings.exchange!r}")


@app.command()
def migrate() -> None:
    """Apply database migrations (safe when two run at once)."""
    from worker.stores.database import migrate as apply_migrations

    _setup_logging()
    applied = apply_migrations(get_settings().database_url.get_secret_value())
    typer.echo(
        f"applied {len(applied)} migrations" + (f": {', '.join(applied)}" if applied else "")
    )


@app.command()
def schemas(
    check: Annotated[bool, typer.Option(help="Fail when the files are out of date.")] = False,
) -> None:
    """Write the JSON Schema files of the event contracts into schemas/."""
    from schemas.export import SCHEMA_DIR, SCHEMA_FILES, render_schema, write_schemas

    if check:
        stale = [
            n for n, m in SCHEMA_FILES.items() if (SCHEMA_DIR / n).read_text() != render_schema(m)
        ]
        if stale:
            typer.echo(f"out of date: {', '.join(stale)}; run `enrich schemas`", err=True)
            raise typer.Exit(1)
        return
    for path in write_schemas():
        typer.echo(f"wrote {path}")


@app.command()
def show(
    product_id: Annotated[str, typer.Argument(help="The product to draw.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
) -> None:
    """Draw a product's photo with its masks and labels."""
    from worker.errors import TransientFault, UnreadableImage
    from worker.show import render_product

    _setup_logging()
    try:
        render_product(get_settings(), product_id, output)
    except (UnreadableImage, TransientFault) as exc:
        typer.echo(f"cannot draw {product_id}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {output}")


@app.command()
def similar(
    product_id: Annotated[str | None, typer.Argument(help="The product to compare.")] = None,
    text: Annotated[str | None, typer.Option(help="Search by this text instead.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many products.")] = 10,
    label: Annotated[list[str] | None, typer.Option(help="Only products with this label.")] = None,
    attribute: Annotated[
        list[str] | None, typer.Option(help="Only products with this attribute.")
    ] = None,
    model_version: Annotated[
        str | None, typer.Option(help="The model version; unset means the space's current one.")
    ] = None,
    space: Annotated[
        str, typer.Option(help="text or image: compare text embeddings or photo embeddings.")
    ] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Products most similar to a product, or to a text (`--text`)."""
    from schemas.queries import SimilarityQuery, Space
    from worker.similarity_cli import print_similar

    if (product_id is None) == (text is None):
        typer.echo("give either PRODUCT_ID or --text", err=True)
        raise typer.Exit(2)
    if space not in set(Space):
        typer.echo(f"--space must be one of {', '.join(Space)}, got {space[:40]!r}", err=True)
        raise typer.Exit(2)

    _setup_logging()
    query = SimilarityQuery(
        k=k,
        labels=label or [],
        attributes=attribute or [],
        model_version=model_version,
        space=Space(space),
    )
    raise typer.Exit(print_similar(get_settings(), query, product_id, text, as_json=as_json))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Serve similarity queries over HTTP (OpenAPI schema at /docs)."""
    import uvicorn

    from worker.api import from_settings

    _setup_logging()
    uvicorn.run(from_settings(get_settings()), host=host, port=port)


@app.command()
def expand(
    term: Annotated[str, typer.Argument(help="The search term, a word or a short phrase.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many labels.")] = 10,
    vocabulary: Annotated[
        Path | None,
        typer.Option(
            help="Labels to choose from, one a line, instead of the tagger's labels and the "
            "stored products' attributes."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Attribute labels nearest to a search term, for keyword and search expansion."""
    from worker.expand import print_expansions

    _setup_logging()
    settings = get_settings()
    raise typer.Exit(
        print_expansions(settings, term, k=k, vocabulary_file=vocabulary, as_json=as_json)
    )


@app.command()
def demo(
    data: DatasetsFolder = DEFAULT_CCP.parent,
    products: Annotated[int, typer.Option(min=1, help="How many products to enrich.")] = 24,
    keep_servers: Annotated[
        bool, typer.Option(help="Leave Postgres and S3 running and print how to reach them.")
    ] = False,
) -> None:
    """Enrich real photos end to end on local servers and print what came out."""
    from worker.demo import run_demo

    _setup_logging()
    raise typer.Exit(run_demo(data, products=products, keep_servers=keep_servers))


@dlq_app.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 1000,
) -> None:
    """Show parked messages with their kind and reason; they stay in the queue."""
    import json

    from worker.dlq import list_dead_letters

    letters = list_dead_letters(get_settings(), limit=limit)
    for letter in letters:
        if as_json:
            typer.echo(json.dumps(letter.as_dict()))
        else:
            preview = letter.body[:60].decode(errors="replace")
            typer.echo(f"{letter.dead_lettered_at}  {letter.kind:<18} {letter.reason[:100]}")
            typer.echo(f"    body: {preview}")
    if not as_json:
        typer.echo(f"{len(letters)} dead-lettered messages")


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[
        DeadLetterKind | None,
        typer.Option("--reason", "--kind", help="Only messages parked for this reason."),
    ] = None,
) -> None:
    """Send parked messages back to the catalog exchange, after a fix."""
    from worker.dlq import replay

    _setup_logging()
    count = replay(get_settings(), kind=reason)
    typer.echo(f"replayed {count} messages")


@app.command()
def backfill(
    from_jsonl: Annotated[
        Path | None, typer.Option(help="A JSON lines file of product-created events.")
    ] = None,
    from_sql: Annotated[
        str | None,
        typer.Option(
            help="A query on the catalog's Postgres returning product_id, title, images (jsonb)"
            " or image_urls (text[]), and optionally description and attributes (text[])."
        ),
    ] = None,
    from_s3: Annotated[
        str | None, typer.Option(help="s3://bucket/prefix/ of JSON lines objects (.gz too).")
    ] = None,
    catalog_url: Annotated[
        str | None,
        typer.Option(
            help="Postgres of --from-sql; unset means ENRICH_DATABASE_URL. Give its password"
            " as PGPASSWORD rather than in the URL, which `ps` shows."
        ),
    ] = None,
    missing: Annotated[bool, typer.Option("--missing", help="Never enriched (default).")] = False,
    stale: Annotated[
        bool, typer.Option("--stale", help="Enriched by other model versions than the current.")
    ] = False,
    every: Annotated[bool, typer.Option("--all", help="Every product of the source.")] = False,
    run_id: Annotated[
        str | None, typer.Option(help="Resume this run; unset starts a new one.")
    ] = None,
    rate: Annotated[float | None, typer.Option(help="At most this many products a second.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Products per database round trip.")] = 2000,
    per_message: Annotated[
        int, typer.Option(help="Products per chunk message, which a worker expands (1-1000).")
    ] = 250,
    wait: Annotated[
        bool, typer.Option(help="Follow the workers until every product is done or failed.")
    ] = True,
) -> None:
    """Submit catalog products for enrichment again, e.g. after a new model version."""
    from pydantic import SecretStr, ValidationError

    from schemas.backfill import BackfillMode, BackfillRequest
    from worker.backfill import backfill_command

    sources = {"jsonl": from_jsonl, "sql": from_sql, "s3": from_s3}
    given = [kind for kind, value in sources.items() if value is not None]
    modes = [mode for mode, on in zip(BackfillMode, (missing, stale, every), strict=True) if on]
    if len(given) != 1 or len(modes) > 1:
        typer.echo(
            "give one of --from-jsonl, --from-sql, --from-s3 and at most one of"
            " --missing, --stale, --all",
            err=True,
        )
        raise typer.Exit(2)

    _setup_logging()
    fields = {"jsonl": "path", "sql": "query", "s3": "url"}
    source: dict[str, object] = {"kind": given[0], fields[given[0]]: sources[given[0]]}
    if catalog_url is not None:
        source["catalog_url"] = SecretStr(catalog_url)
    try:
        request = BackfillRequest.model_validate(
            {
                "source": source,
                "mode": modes[0] if modes else BackfillMode.MISSING,
                "run_id": run_id,
                "rate": rate,
                "chunk_size": chunk_size,
                "products_per_message": per_message,
            }
        )
    except ValidationError as exc:
        typer.echo(f"cannot backfill: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(backfill_command(get_settings(), request, wait=wait))


@app.command()
def status(
    run: Annotated[str | None, typer.Option(help="One run; unset lists the latest.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Backfill runs: submitted, done, failed and pending, failures grouped by reason."""
    from worker.backfill import print_status

    raise typer.Exit(print_status(get_settings(), run, as_json=as_json))


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            file_okay=False,
            help="The shared datasets folder, holding ccp/ and clothing-small/; unset: the "
            "one beside the checkout.",
        ),
    ] = None,
    events: Annotated[int, typer.Option(help="Events through the whole worker.")] = 200,
    photos: Annotated[int, typer.Option(help="Photos the stages are timed on.")] = 32,
    concurrency: Annotated[
        int | None, typer.Option(help="Worker task threads; unset: twice the batch size.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Benchmarks; without a subcommand, the stages alone and the whole worker on real
    photos (local Postgres and S3, the configured RabbitMQ)."""
    # Checked here, not by the option: a default that must exist would stop every subcommand
    # on a machine without the datasets beside the checkout (deploy/gpu-bench.sh's).
    if ctx.invoked_subcommand is not None:
        return
    datasets = data or DEFAULT_CCP.parent
    if not datasets.is_dir():
        raise typer.BadParameter(f"{datasets} is not a directory", param_hint="'--data'")

    from worker.bench import BenchConfig, print_bench

    _setup_logging()
    config = BenchConfig(datasets=datasets, events=events, photos=photos, concurrency=concurrency)
    raise typer.Exit(print_bench(get_settings(), config, as_json=as_json))


@bench_app.command("stages")
def bench_stages(
    data: DatasetsFolder = DEFAULT_CCP.parent,
    photos: Annotated[int, typer.Option(min=1, help="Photos the stages are timed on.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Each model stage alone, at batch size 1 and at ENRICH_BATCH__MAX_SIZE, without the
    worker: no broker, database or S3 server is needed."""
    import json

    from worker.bench_stages import bench_products, run_stages_bench

    _setup_logging()
    result = run_stages_bench(get_settings(), bench_products(data, photos))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for stage, figures in result["stages"].items():
        typer.echo(
            f"{stage:<14} {figures['batch_1_per_s']:>8.2f} {figures['unit']}/s at batch 1,"
            f" {figures['batched_per_s']:>8.2f} at {figures['batch_size']}"
            f" (x{figures['ratio']:.2f})"
        )
    typer.echo(f"stages alone   {result['stages_alone_events_per_s']:.3f} events/s")


@bench_app.command("precision")
def bench_precision(
    data: DatasetsFolder = DEFAULT_CCP.parent,
    photos: Annotated[int, typer.Option(min=1, help="Product photos to compare on.")] = 32,
    cpu_dtype: Annotated[
        AutocastDtype | None,
        typer.Option(help="On a CPU, autocast to this dtype to run the comparison."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Each stage under mixed precision against float32 on the same photos, and the stages
    to keep float32 (ENRICH_BATCH__FULL_PRECISION_STAGES)."""
    import torch

    from worker.precision import print_precision_check, run_precision_check

    _setup_logging()
    try:
        report = run_precision_check(
            get_settings(),
            data,
            photos=photos,
            cpu_dtype=None if cpu_dtype is None else getattr(torch, cpu_dtype),
        )
    except ValueError as exc:
        typer.echo(f"enrich: {exc}", err=True)
        raise typer.Exit(2) from exc
    print_precision_check(report, as_json=as_json)


@bench_app.command("similarity")
def bench_similarity(
    rows: Annotated[int, typer.Option(help="Synthetic products to load.")] = 100_000,
    queries: Annotated[int, typer.Option(help="Queries per run, unfiltered and filtered.")] = 200,
    dim: Annotated[
        int | None, typer.Option(help="Embedding dimension; unset reads the configured model's.")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="A Postgres with pgvector to create the database on; unset starts one."),
    ] = None,
    maintenance_work_mem: Annotated[str, typer.Option(help="For the index build.")] = "4GB",
    workers: Annotated[
        int | None, typer.Option(help="Parallel index-build workers; unset: CPUs less one.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    reuse: Annotated[
        bool,
        typer.Option(
            help="--database-url is a bench database loaded and indexed before (an interrupted"
            " run's): measure the queries only."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Index build time, query latency and recall@10 of similarity search on N vectors."""
    from worker.bench_similarity import BenchConfig, configured_dimension, print_bench

    _setup_logging()
    config = BenchConfig(
        rows=rows,
        dimension=dim or configured_dimension(get_settings()),
        queries=queries,
        seed=seed,
        maintenance_work_mem=maintenance_work_mem,
        **({} if workers is None else {"maintenance_workers": workers}),
    )
    raise typer.Exit(print_bench(config, database_url, as_json=as_json, reuse=reuse))


@app.command("eval")
def evaluate(
    data: CcpFolder = DEFAULT_CCP,
    coco: Annotated[
        Path | None, typer.Option(help="A COCO instance-segmentation file, instead of CCP.")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="The COCO file's image folder.")] = None,
    split: Annotated[
        str, typer.Option(help="validation (held out from training) or all.")
    ] = "validation",
    limit: Annotated[int | None, typer.Option(help="At most this many photos per set.")] = None,
    product_photos: Annotated[
        Path | None, typer.Option(help="Product photos, one folder per label.")
    ] = DEFAULT_CCP.parent / "clothing-small" / "validation",
    products: Annotated[
        Path | None, typer.Option(help="JSON lines of products with title, ... and label.")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Nearest neighbours per product.")] = 5,
    threads: Annotated[int | None, typer.Option(help="torch threads on the CPU.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Measure the worker's models on labelled photos: mask AP50 and IoU, tag F1, neighbours."""
    from worker.evaluate import (
        EvaluationInputError,
        EvaluationOptions,
        Split,
        format_table,
        run_evaluation,
        to_json,
    )

    if split not in set(Split):
        typer.echo(f"--split must be one of {', '.join(Split)}, got {split[:40]!r}", err=True)
        raise typer.Exit(2)

    _setup_logging()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    options = EvaluationOptions(
        data=data,
        coco=coco,
        images=images,
        product_photos=product_photos,
        products=products,
        split=Split(split),
        limit=limit,
        k=k,
    )
    try:
        document = run_evaluation(get_settings(), options)
    except EvaluationInputError as exc:
        typer.echo(f"cannot evaluate: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(to_json(document) if as_json else format_table(document))


@train_app.command("segmenter")
def train_segmenter(
    data: CcpFolder = DEFAULT_CCP,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = REPO_ROOT
    / "models/segmenter",
    epochs: Annotated[int, typer.Option()] = 4,
    image_size: Annotated[int, typer.Option(help="Shorter side in pixels.")] = 288,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 4,
    learning_rate: Annotated[float, typer.Option()] = 5e-4,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop fitting after this long (CPU runs).")
    ] = 20.0,
    threads: Annotated[int, typer.Option(help="torch threads on the CPU.")] = 1,
    score_threshold: Annotated[float, typer.Option(help="Shipped instance threshold.")] = 0.4,
    products: Annotated[
        Path | None, typer.Option(help="Product photos to spot-check (clothing-small).")
    ] = DEFAULT_CCP.parent / "clothing-small" / "validation",
    device: Annotated[str | None, typer.Option(help="cuda or cpu; unset picks CUDA.")] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Segmenter folder to continue from instead of the ImageNet backbone."),
    ] = None,
) -> None:
    """Fine-tune the Mask R-CNN segmenter (EfficientNet-Lite0 backbone) on CCP."""
    from handlers.training.segmenter import train_segmenter as train

    _setup_logging()
    figures = train(
        data,
        out,
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_minutes=max_minutes,
        num_threads=threads,
        score_threshold=score_threshold,
        device=device,
        products_root=products,
        init_from=init_from,
    )
    typer.echo(figures)


@train_app.command("tagger")
def train_tagger(
    data: CcpFolder = DEFAULT_CCP,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = REPO_ROOT / "models/tagger",
    epochs: Annotated[int, typer.Option(help="Epochs of the whole network.")] = 3,
    freeze_epochs: Annotated[int, typer.Option(help="Head-only epochs first.")] = 3,
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 224,
    seed: Annotated[int, typer.Option()] = 0,
    threshold: Annotated[
        float, typer.Option(help="Every label's threshold before calibration, and its fallback.")
    ] = 0.2,
    threshold_floor: Annotated[
        float, typer.Option(help="No calibrated threshold is lower.")
    ] = 0.05,
    base_lr: Annotated[float, typer.Option()] = 2e-3,
    lr_mult: Annotated[float, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 32,
    min_label_count: Annotated[int, typer.Option(help="Labels on fewer photos are left out.")] = 50,
    threads: Annotated[int, typer.Option(help="torch threads on the CPU.")] = 1,
    calibrate_only: Annotated[
        bool,
        typer.Option(
            help="Do not train: choose the per-label thresholds of the tagger folder --out "
            "again on the validation photos, in its tagger.json and MODEL_CARD.md."
        ),
    ] = False,
    reexport: Annotated[
        bool,
        typer.Option(
            help="Do not train: write the export.pkl of the tagger folder --out again with "
            "every function by name, so that it loads on other Python releases."
        ),
    ] = False,
) -> None:
    """Fine-tune the fastai multi-label tagger (EfficientNet-Lite0 backbone) on CCP tags,
    then calibrate one threshold per label on the validation photos."""
    from handlers.training.tagger import calibrate_tagger, reexport_tagger
    from handlers.training.tagger import train_tagger as train

    _setup_logging()
    if reexport:
        typer.echo(f"{reexport_tagger(out)} bytes written to {out / 'export.pkl'}")
        return
    if calibrate_only:
        calibration = calibrate_tagger(
            out, data, default_threshold=threshold, floor=threshold_floor, batch_size=batch_size
        )
        typer.echo(calibration.model_dump_json(indent=2))
        return

    figures = train(
        data,
        out,
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        threshold=threshold,
        threshold_floor=threshold_floor,
        freeze_epochs=freeze_epochs,
        base_lr=base_lr,
        lr_mult=lr_mult,
        batch_size=batch_size,
        min_label_count=min_label_count,
        num_threads=threads,
    )
    typer.echo(figures)


if __name__ == "__main__":
    app()
