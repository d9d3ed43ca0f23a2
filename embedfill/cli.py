"""The command line: split off the verb, resolve the settings once, delegate, map errors to exit codes.

The parser of each verb is in parser.py, the settings in settings.py; this module runs no SQL itself.
"""

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2

from . import db, logs
from .errors import EXIT_FATAL, EXIT_SIGINT, DatabaseError, EtlError, Stop, UsageError
from .options import OPTIONS, extra_body_secrets
from .parser import build_parser, command_name, split_verb
from .providers import make_provider
from .settings import Settings, read_config_file, resolve, unknown_settings

log = logging.getLogger(__name__)

DEFAULT_DIMENSIONS = 1536  # the demo's column for a model the tool knows no size of

# What dispatch passes on: option dest (or command-line-only field) to the flag's value, None when not given.
Flags = dict[str, Any]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    verb, rest = split_verb(list(sys.argv[1:] if argv is None else argv))
    passed: list[str] = []  # `db psql -- ARGS`: ARGS go to psql as they are
    if verb == "db" and "--" in rest:
        rest, passed = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
    args = build_parser(verb).parse_args(rest)
    args.passed = passed
    level = "INFO"
    try:
        flags: Flags = {option.dest: getattr(args, option.dest, None) for option in OPTIONS}
        command_line = ("limit", "retry_failed", "dry_run", "no_wait", "progress_interval")
        flags.update({key: getattr(args, key, None) for key in command_line})
        flags["batch_api"] = getattr(args, "batch_api", None)
        flags["truncate"] = False if getattr(args, "no_truncate", False) else None
        path = args.config or "config.env"
        file_values = read_config_file(path, explicit=args.config is not None)
        for warning in unknown_settings(file_values, os.environ, path):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        preliminary = resolve(flags, os.environ, file_values)
        logs.add_secrets(preliminary.api_key, preliminary.azure_api_key, db.password(preliminary.database_url or ""))
        logs.add_secrets(*extra_body_secrets(preliminary.extra_body))
        level = preliminary.log_level
        logs.configure(preliminary.log_level, preliminary.log_file, preliminary.log_format)
        return dispatch(verb, args, flags, file_values, preliminary)
    except EtlError as error:
        _report(error, level)
        return error.exit_code
    except psycopg2.Error as error:  # one the code did not expect where it happened: say it, with advice
        _report(DatabaseError(f"database error: {db.explain(error)}"), level, error)
        return EXIT_FATAL
    except (Stop, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stop) else None
        print(logs.error_line(f"interrupted{f' by {signal.Signals(signum).name}' if signum else ''}"), file=sys.stderr)
        return stop.exit_code if isinstance(stop, Stop) else EXIT_SIGINT
    except Exception as error:  # a bug: one line unless DEBUG
        message = f"unexpected {type(error).__name__}: {error} (rerun with --log-level DEBUG for details)"
        _report(EtlError(message), level, error)
        return EXIT_FATAL


def _report(error: BaseException, level: str, original: BaseException | None = None) -> None:
    """The one line of an error (a traceback before it at DEBUG), with every secret redacted."""
    if level == "DEBUG":
        print(logs.redact("".join(traceback.format_exception(original or error))), file=sys.stderr, end="")
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(logs.error_line(message), file=sys.stderr, flush=True)


def dispatch(
    verb: str, args: argparse.Namespace, flags: Flags, file_values: Mapping[str, str], preliminary: Settings
) -> int:
    """Run one verb with its settings; returns the exit code."""
    from . import driver, init, pgserver, search, status, verify

    if verb == "db":
        return pgserver.db_command(
            args.action, preliminary.pgdata, preliminary.database_url, sys.stdout, args.force, args.passed
        )
    embedded = preliminary.database_url is None
    if embedded:
        flags = {**flags, "database_url": pgserver.embedded_database_url(preliminary.pgdata)}

    if verb == "demo":
        return run_demo(args, flags, file_values, preliminary.pgdata if embedded else None)
    if verb in ("status", "search", "embed", "verify") and embedded and not preliminary.table:
        # Without configuration these look at the demo's table, with the demo's provider.
        flags = _demo_flags(flags, preliminary)
    if verb == "serve":
        from .service import Service

        return Service(resolve(flags, os.environ, file_values)).serve()
    required = ("table",) if verb == "init" else ("table", "text_columns")
    settings = resolve(flags, os.environ, file_values, required=required)
    if verb == "init":
        if args.reset_column and not args.yes:
            raise UsageError(
                f"init --reset-column sets {settings.table}.{settings.embedding_column} to NULL in every row and "
                "forgets what it held and the table's failed rows: add --yes to do it"
            )
        tracking = "untrack" if args.untrack else "track" if args.track_changes else None
        code = init.init_schema(settings, sys.stdout, args.type, args.restore_index, tracking)
        return init.reset_column(settings, sys.stdout) if args.reset_column else code
    if verb == "status":
        return status.show_status(settings, sys.stdout, as_json=args.json)
    if verb == "search":
        return search.search(settings, args.query, args.top, sys.stdout, as_json=args.json)
    if verb == "embed":
        return search.embed(settings, args.text, sys.stdout)
    if verb == "verify":
        return verify.verify(settings, None if args.all else args.sample, args.fix, sys.stdout, as_json=args.json)
    if settings.follow and settings.limit is not None:
        raise UsageError("--limit and --follow do not go together: a follower has no end (drop one of them)")
    if settings.no_wait and not settings.batch_api:
        raise UsageError("--no-wait goes with --batch-api (or ETL_BATCH_API=true)")
    if settings.batch_api and (settings.follow or settings.defer_index):
        raise UsageError("--batch-api does not go with --follow or --defer-index (drop one of them)")
    if verb == "batches" or (settings.batch_api and not settings.dry_run):
        from . import batches

        if verb == "batches":
            return batches.cancel_batches(settings, sys.stdout)
        return batches.run_batches(settings)
    return driver.run_backfill(settings)


def _demo_flags(flags: Flags, preliminary: Settings) -> Flags:
    from .demo import DEMO_TABLE, DEMO_TEXT_COLUMNS

    flags = {**flags, "table": DEMO_TABLE, "text_columns": DEMO_TEXT_COLUMNS}
    if preliminary.provider == "openai" and not preliminary.api_key and flags.get("provider") is None:
        flags["provider"] = "local"
    return flags


def run_demo(args: argparse.Namespace, flags: Flags, file_values: Mapping[str, str], pgdata: str | None) -> int:
    """The demo: its table (resumed when an earlier demo was interrupted), the backfill, what to do next.
    `pgdata`: the embedded server's data folder, None with DATABASE_URL."""
    from . import demo, driver

    flags = _demo_flags(flags, resolve(flags, os.environ, file_values))
    flags["id_column"], flags["embedding_column"] = "id", "embedding"
    settings = resolve(flags, os.environ, file_values)
    if settings.provider == "local":
        print("no OPENAI_API_KEY: embedding with the local provider (lexical hashing, not semantic)", file=sys.stderr)
    dimensions = make_provider(settings).output_dimensions or DEFAULT_DIMENSIONS  # a model of unknown size
    demo.prepare_table(settings, args.rows, dimensions, sys.stdout)
    code = driver.run_backfill(settings)
    if code == 0 and not settings.dry_run:
        for line in next_steps(pgdata, settings.database_url):
            print(line, file=sys.stdout)
    return code


def next_steps(pgdata: str | None, url: str | None) -> list[str]:
    """What the demo prints at its end: the database to use, the commands to try next."""
    from . import pgserver

    cmd = command_name()
    lines = []
    if pgdata is not None:  # the embedded server: its URL holds no password
        lines.append(f"DATABASE_URL={pgserver.shareable_url(url)}")
    lines.append(f'next: {cmd} search "김치찌개"')
    if pgdata is not None:
        if pgserver.kept(pgserver.data_folder(pgdata)):
            lines.append(f"next: {cmd} db psql    # psql on it; it stays up until `{cmd} db stop`")
        else:
            lines.append(f"next: {cmd} db url     # keep this server up for psql, Django or psycopg2 and print its URL")
            lines.append(f"next: {cmd} db psql    # psql on it; `{cmd} db stop` stops it")
    return lines
