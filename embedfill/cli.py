"""The command line: parse, resolve the settings once, delegate, map errors to exit codes."""

import argparse
import dataclasses
import difflib
import logging
import os
import sys
import traceback

import psycopg2

from . import config, db, logs
from .config import OPTIONS, resolve
from .errors import EXIT_FATAL, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, DatabaseError, EtlError, Terminated, UsageError
from .models import DEFAULT_MODEL, LOCAL_DEFAULT_DIMENSIONS, model_info

log = logging.getLogger(__name__)

VERBS = ("run", "init", "status", "demo", "search", "verify", "batches")

EXAMPLES = """\
examples:
  python etl.py --workers 4 --batch-size 20
  nohup python etl.py --workers 4 --batch-size 20 > etl.log 2>&1 &    # rerun to resume
  python etl.py --dry-run                  # rows, tokens, cost and ranges, no API calls
  python etl.py init --dimensions 1536     # extension, ledger, column and partial index
  python etl.py status                     # where the table stands, and whether a run is active
  python etl.py init --track-changes       # a trigger: an edited text sets its row's vector to NULL
  nohup python etl.py --follow > follow.log 2>&1 &    # the backlog, then new and edited rows as they come
  python etl.py demo                       # a local embedfill_demo table, embedded (offline without a key)
  python etl.py search "김치찌개" --top 5
  python etl.py verify --sample 100        # re-embed 100 random rows and compare with what is stored
  python etl.py init --reset-column --yes  # clear the column and its record, to fill it with another model
  python etl.py --batch-api                # OpenAI's Batch API: half the price, within 24 h; rerun to resume
  python etl.py batches cancel             # cancel this table's pending batches

verbs: run (the default), init, status, demo, search, verify, batches; `python etl.py VERB --help` for each.
Settings come from flags, then the environment, then config.env (see config.env.example).
exit codes: 0 all selected rows embedded, 1 fatal error, 2 usage error,
  3 finished but some rows failed (recorded in etl_failures) or, for verify, hold a vector that is not
  their text's, 130/143 interrupted by SIGINT/SIGTERM.
"""

DESCRIPTIONS = {
    "run": "Fill the pgvector column of every row whose embedding IS NULL, from parallel workers, "
    "resumable by rerunning; with --follow, then stay up and embed new and edited rows as they come.",
    "init": "Create what the tool relies on, idempotently: the vector extension, the etl_failures ledger, "
    "the embedding column (with --dimensions) and the partial index WHERE embedding IS NULL; with "
    "--track-changes also a trigger that sets a row's vector to NULL when its text changes (--untrack removes it).",
    "status": "Show where the configured table stands: rows total (estimate), rows still NULL, failed rows "
    "and their reasons, whether a run is active now, whether change tracking is on, and with --updated-column "
    "how old the oldest NULL row is.",
    "demo": "Create (or refresh) the embedfill_demo table, foods like the seed's, and backfill it; a table of that "
    "name the demo did not make is never replaced. Without "
    "OPENAI_API_KEY it embeds offline with the local provider.",
    "search": "Embed a query with the configured provider and print the nearest rows by cosine distance.",
    "verify": "Re-embed stored rows (a random sample, or --all) and compare each with its stored vector "
    "(cosine >= 0.99); name every row that does not match, and with --fix set it to NULL for the next run.",
    "batches": "Act on this table's pending --batch-api batches: `cancel` cancels them at OpenAI and releases "
    "their rows.",
}


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a misspelled flag, and exit code 2 for usage errors."""

    def error(self, message):
        if "unrecognized arguments:" in message:
            words = message.split("unrecognized arguments:", 1)[1].split()
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            for word in words:
                candidates = known if word.startswith("-") else list(VERBS)
                guess = difflib.get_close_matches(word.split("=")[0], candidates, n=1)
                if guess:
                    message += f" (did you mean {guess[0]}?)"
                    break
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _option_help(option):
    details = [f"env {option.env}"] if option.env else []
    details += [f"default {option.default}"] if option.default not in (None, ()) else []
    return f"{option.help} [{', '.join(details)}]" if details else option.help


def build_parser(verb):
    prog = "etl.py" if verb == "run" else f"etl.py {verb}"
    parser = Parser(
        prog=prog, description=DESCRIPTIONS[verb], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if verb == "search":
        parser.add_argument("query", help="the text to look for")
        parser.add_argument("--top", type=int, default=5, help="how many rows to show [default 5]")
    if verb == "init":
        parser.add_argument("--type", choices=("vector", "halfvec"), default="vector", help="type of a new column")
        parser.add_argument(
            "--restore-index", action="store_true", help="rebuild the vector indexes that --defer-index dropped"
        )
        parser.add_argument(
            "--reset-column",
            action="store_true",
            help="set the embedding column to NULL in every row and forget what it held (needs --yes)",
        )
        parser.add_argument("--yes", action="store_true", help="confirm --reset-column")
    if verb == "verify":
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--sample", type=_positive, default=100, help="random rows to check [default 100]")
        which.add_argument("--all", action="store_true", help="check every row that holds a vector")
        parser.add_argument("--fix", action="store_true", help="set the mismatched rows' embedding to NULL")
    if verb == "batches":
        parser.add_argument("action", choices=["cancel"], help="cancel: cancel the pending batches")
    if verb == "run":
        parser.add_argument(
            "--batch-api",
            action="store_true",
            default=None,
            help="embed through OpenAI's Batch API at half the price, within 24 h [env ETL_BATCH_API]",
        )
        parser.add_argument("--no-wait", action="store_true", help="with --batch-api: submit, then exit 0 (for cron)")
    if verb == "demo":
        parser.add_argument("--rows", type=_positive, default=10_000, help="rows to generate [default 10000]")
    if verb == "init":
        track = parser.add_mutually_exclusive_group()
        track.add_argument(
            "--track-changes",
            action="store_true",
            help="install a trigger that sets the vector to NULL when a text column changes, and notifies --follow",
        )
        track.add_argument("--untrack", action="store_true", help="remove that trigger (and only that)")
    if verb in ("run", "demo"):
        parser.add_argument("--limit", type=_positive, help="stop after N rows [default: all rows]")
        parser.add_argument("--retry-failed", action="store_true", help="take the rows in etl_failures again")
        parser.add_argument(
            "--no-truncate", action="store_true", help="record over-long inputs as failed instead of truncating them"
        )
    if verb in ("run", "demo", "verify"):
        parser.add_argument("--dry-run", action="store_true", help="plan only: rows, tokens, cost, time; no API calls")
        parser.add_argument(
            "--progress-interval",
            type=float,
            default=10.0,
            metavar="S",
            help="seconds between progress lines when stderr is not a terminal [default 10]",
        )
    parser.add_argument("--config", metavar="PATH", help="settings file [default: ./config.env when present]")
    group = parser.add_argument_group("settings (a flag wins over the environment, which wins over config.env)")
    for option in OPTIONS:
        if option.parse is config.boolean and option.flag:
            group.add_argument(
                option.flag, dest=option.dest, action="store_const", const=True, help=_option_help(option)
            )
        elif option.flag:
            group.add_argument(
                option.flag,
                dest=option.dest,
                type=_flag_type(option.parse, option.dest),
                metavar=option.metavar,
                help=_option_help(option),
            )
    return parser


def _flag_type(parse_text, name):
    """argparse's type for a flag: the setting's own parser, its message on a bad value."""

    def parse(text):
        try:
            return parse_text(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


_positive = _flag_type(config._positive_int, "N")


def split_verb(argv):
    if argv and argv[0] in VERBS:
        return argv[0], argv[1:]
    return "run", argv


def main(argv=None):
    """Run the command line; returns the exit code."""
    verb, rest = split_verb(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(verb).parse_args(rest)
    level = "INFO"
    try:
        flags = {option.dest: getattr(args, option.dest, None) for option in OPTIONS}
        flags.update({key: getattr(args, key, None) for key in ("limit", "retry_failed", "dry_run", "no_wait")})
        flags["batch_api"] = getattr(args, "batch_api", None)
        flags["truncate"] = False if getattr(args, "no_truncate", False) else None
        file_values = config.read_config_file(args.config or "config.env", explicit=args.config is not None)
        preliminary = resolve(flags, os.environ, file_values)
        logs.add_secrets(preliminary.api_key, preliminary.azure_api_key, db.password(preliminary.database_url or ""))
        level = preliminary.log_level
        logs.configure(preliminary.log_level, preliminary.log_file)
        return dispatch(verb, args, flags, file_values, preliminary)
    except EtlError as error:
        _report(error, level)
        return error.exit_code
    except psycopg2.Error as error:  # one the code did not expect where it happened: say it, with advice
        _report(DatabaseError(f"database error: {db.explain(error)}"), level, error)
        return EXIT_FATAL
    except KeyboardInterrupt as stop:
        print("error: interrupted", file=sys.stderr)
        return EXIT_SIGTERM if isinstance(stop, Terminated) else EXIT_SIGINT
    except Exception as error:  # a bug: one line unless DEBUG
        message = f"unexpected {type(error).__name__}: {error} (rerun with --log-level DEBUG for details)"
        _report(EtlError(message), level, error)
        return EXIT_FATAL


def _report(error, level, original=None):
    """The one line of an error (a traceback before it at DEBUG), with every secret redacted."""
    if level == "DEBUG":
        print(logs.redact("".join(traceback.format_exception(original or error))), file=sys.stderr, end="")
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"error: {logs.redact(message)}", file=sys.stderr, flush=True)


def dispatch(verb, args, flags, file_values, preliminary):
    from . import admin, demo, driver, verify
    from .pgserver import embedded_database_url

    embedded = preliminary.database_url is None
    if embedded:
        flags = {**flags, "database_url": embedded_database_url(preliminary.pgdata)}
    extras = {"progress_interval": getattr(args, "progress_interval", 10.0)}

    if verb == "demo":
        return run_demo(args, flags, file_values, extras, driver, demo)
    if verb in ("status", "search", "verify") and embedded and not preliminary.table:
        # Without configuration these look at the demo's table, with the demo's provider.
        flags = _demo_flags(flags, preliminary)
    settings = _resolve(flags, file_values, ("table",) if verb == "init" else ("table", "text_columns"), extras)
    if verb == "init":
        if args.reset_column and not args.yes:
            raise UsageError(
                f"init --reset-column sets {settings.table}.{settings.embedding_column} to NULL in every row and "
                "forgets what it held and the table's failed rows: add --yes to do it"
            )
        tracking = "untrack" if args.untrack else "track" if args.track_changes else None
        code = admin.init_schema(settings, sys.stdout, args.type, args.restore_index, tracking)
        return admin.reset_column(settings, sys.stdout) if args.reset_column else code
    if verb == "status":
        return admin.show_status(settings, sys.stdout)
    if verb == "search":
        return admin.search(settings, args.query, args.top, sys.stdout)
    if verb == "verify":
        return verify.verify(settings, None if args.all else args.sample, args.fix, sys.stdout)
    if settings.follow and settings.limit is not None:
        raise UsageError("--limit and --follow do not go together: a follower has no end (drop one of them)")
    if settings.no_wait and not settings.batch_api:
        raise UsageError("--no-wait goes with --batch-api (or ETL_BATCH_API=true)")
    if settings.batch_api and (settings.follow or settings.defer_index):
        raise UsageError("--batch-api does not go with --follow or --defer-index (drop one of them)")
    if verb == "batches" or (settings.batch_api and not settings.dry_run):
        from . import batchapi

        if verb == "batches":
            return batchapi.cancel_batches(settings, sys.stdout)
        return batchapi.run_batches(settings)
    return driver.run_backfill(settings)


def _resolve(flags, file_values, required, extras=None):
    settings = resolve(flags, os.environ, file_values, required=required)
    if extras:
        settings = dataclasses.replace(settings, extras=extras)
    return settings


def _demo_flags(flags, preliminary):
    from .demo import DEMO_TABLE, DEMO_TEXT_COLUMNS

    flags = {**flags, "table": DEMO_TABLE, "text_columns": DEMO_TEXT_COLUMNS}
    if preliminary.provider == "openai" and not preliminary.api_key and flags.get("provider") is None:
        flags["provider"] = "local"
    return flags


def run_demo(args, flags, file_values, extras, driver, demo):
    flags = _demo_flags(flags, resolve(flags, os.environ, file_values))
    flags["id_column"], flags["embedding_column"] = "id", "embedding"
    settings = _resolve(flags, file_values, (), extras)
    if settings.provider == "local":
        dimensions = settings.dimensions or LOCAL_DEFAULT_DIMENSIONS
        print("no OPENAI_API_KEY: embedding with the local provider (lexical hashing, not semantic)", file=sys.stderr)
    else:
        info = model_info(settings.model) or model_info(DEFAULT_MODEL)
        dimensions = settings.dimensions or info.dimensions
    demo.create_demo_table(settings.database_url, args.rows, dimensions, sys.stdout)
    code = driver.run_backfill(settings)
    if code == 0 and not settings.dry_run:
        print('next: python etl.py search "김치찌개"', file=sys.stdout)
    return code
