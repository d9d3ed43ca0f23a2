"""The argument parser of each verb: its own flags, the flags of the settings it reads (from the
options table), its description, examples and exit codes in --help, and advice on a mistyped flag."""

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import EXIT_USAGE
from .options import OPTIONS, VERBS, Option, boolean, positive_int

# Each verb's own examples, with {cmd} the way it was started (python etl.py, or embedfill when installed).
EXAMPLES = {
    "run": [
        ("{cmd} --workers 4 --batch-size 20", ""),
        ("nohup {cmd} --workers 4 --batch-size 20 > etl.log 2>&1 &", "rerun to resume"),
        ("{cmd} --dry-run", "rows, tokens, cost and ranges, no API calls"),
        ("nohup {cmd} --follow > follow.log 2>&1 &", "the backlog, then new and edited rows as they come"),
        ("{cmd} --batch-api", "OpenAI's Batch API: half the price, within 24 h; rerun to resume"),
    ],
    "init": [
        ("{cmd} init --dimensions 1536", "extension, ledger, column and partial index"),
        ("{cmd} init --track-changes", "a trigger: an edited text sets its row's vector to NULL"),
        ("{cmd} init --reset-column --yes", "clear the column and its record, to fill it with another model"),
        ("{cmd} init --restore-index", "rebuild the vector indexes a --defer-index run dropped"),
    ],
    "status": [
        ("{cmd} status", "where the table stands, and whether a run is active"),
        ("{cmd} status --json", "the same, as one JSON document"),
    ],
    "demo": [
        ("{cmd} demo", "a local embedfill_demo table, embedded (offline without a key); rerun to resume"),
        ("{cmd} demo --rows 1000 --workers 2", ""),
    ],
    "search": [
        ('{cmd} search "김치찌개" --top 5', "the nearest rows by cosine distance"),
        ('{cmd} search "kimchi stew" --json', "id, distance and text of each, as JSON"),
    ],
    "embed": [('{cmd} embed "김치찌개"', "the vector the column's model makes for a text, as JSON")],
    "verify": [
        ("{cmd} verify --sample 100", "re-embed 100 random rows and compare with what is stored"),
        ("{cmd} verify --all --fix", "check every row; set the mismatched ones to NULL for the next run"),
    ],
    "batches": [("{cmd} batches cancel", "cancel this table's pending batches")],
    "serve": [
        ("{cmd} serve", "keep every tracked column filled (init --track-changes tracks one)"),
        ("{cmd} serve --workers 8 --http 127.0.0.1:9300", "with /healthz and /metrics (docs/serve.md)"),
    ],
    "db": [
        ("{cmd} db url", "start the embedded PostgreSQL, keep it up, print its URL"),
        ("{cmd} db psql", "psql on it (extra psql arguments after --)"),
        ("{cmd} db stop", "stop it"),
    ],
}

FOOTER = """\
verbs: run (the default), init, status, demo, search, embed, verify, batches, serve, db; `{cmd} VERB --help` for each.
Settings come from flags, then the environment, then config.env (docs/configuration.md lists them all).
exit codes: 0 all selected rows embedded, 1 fatal error, 2 usage error,
  3 finished but some rows failed (recorded in etl_failures) or, for verify, hold a vector that is not
  their text's, 130/143 interrupted by SIGINT/SIGTERM.
"""

DESCRIPTIONS = {
    "run": "Fill the pgvector column of every row whose embedding IS NULL, from parallel workers, "
    "resumable by rerunning; with --follow, then stay up and embed new and edited rows as they come.",
    "init": "Create what the tool relies on, idempotently: the vector extension, its etl_* tables, "
    "the embedding column (with --dimensions) and the partial index WHERE embedding IS NULL; with "
    "--track-changes also a trigger that sets a row's vector to NULL when its text changes (--untrack removes it). "
    "Everything is checked before anything is created, and it says what it created.",
    "status": "Show where the configured table stands: rows total (estimate), rows still NULL, failed rows "
    "and their reasons, whether a run is active now, whether change tracking is on, and with --updated-column "
    "how old the oldest NULL row is.",
    "demo": "Create the embedfill_demo table, foods like the seed's, and backfill it; rerun to resume an interrupted "
    "demo; a table of that name the demo did not make is never replaced. Without "
    "OPENAI_API_KEY it embeds offline with the local provider.",
    "search": "Embed a query with the configured provider and print the nearest rows by cosine distance.",
    "embed": "Print the vector that the column's model and settings make for a text, as JSON "
    '({"model", "dimensions", "embedding"}), so that an application can search with the same vector.',
    "verify": "Re-embed stored rows (a random sample, or --all) and compare each with its stored vector "
    "(cosine >= 0.99); name every row that does not match, and with --fix set it to NULL for the next run.",
    "batches": "Act on this table's pending --batch-api batches: `cancel` cancels them at OpenAI and releases "
    "their rows.",
    "serve": "Keep every tracked column of the database filled, as one long-running service: the columns that "
    "`init --track-changes` tracks, each with the model, provider and text columns its record in etl_columns "
    "names, from one pool of workers shared fairly between them; until SIGTERM. With --http, GET /healthz "
    "and GET /metrics (Prometheus). docs/serve.md: systemd, Kubernetes, the metrics.",
    "db": "The embedded PostgreSQL of ETL_PGDATA, for other programs: `url` starts it if needed, keeps it up and "
    "prints a URL that psql, Django and psycopg2 accept; `psql` opens psql on it; `stop` stops it.",
}


def command_name() -> str:
    """How the user started the tool: `embedfill` when installed, else `python etl.py`."""
    return "embedfill" if Path(sys.argv[0]).name == "embedfill" else "python etl.py"


def epilog(verb: str) -> str:
    """The end of a verb's --help: its examples, what it reads from the environment only, the exit codes."""
    cmd = command_name()
    width = max(len(example.format(cmd=cmd)) for example, _ in EXAMPLES[verb])
    lines = ["examples:"]
    for example, note in EXAMPLES[verb]:
        text = example.format(cmd=cmd)
        lines.append(f"  {text:<{width}}    # {note}" if note else f"  {text}")
    env_only = [o.env for o in OPTIONS if verb in o.verbs and not o.flag and o.dest != "batch_api"]
    if env_only:
        lines.append(f"\nalso read, from the environment or config.env only: {', '.join(env_only)}")
    return "\n".join(lines) + "\n\n" + FOOTER.format(cmd=cmd)


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a misspelled flag, and exit code 2 for usage errors."""

    verb = "run"
    own_actions: list[argparse.Action]  # the verb's own flags (not settings), for docs/configuration.md

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments:" in message:
            words = message.split("unrecognized arguments:", 1)[1].split()
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            for word in words:
                flag = word.split("=")[0]
                other = next((o for o in OPTIONS if o.flag == flag and self.verb not in o.verbs), None)
                if other is not None:  # a setting of other verbs: say whose
                    message += f" ({flag} is read by {', '.join(other.verbs)}, not by {self.verb})"
                    break
                candidates = known if word.startswith("-") else list(VERBS)
                guess = difflib.get_close_matches(flag, candidates, n=1)
                if guess:
                    message += f" (did you mean {guess[0]}?)"
                    break
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _option_help(option: Option) -> str:
    details = [f"env {option.env}"]
    details += [f"default {option.default}"] if option.default not in (None, ()) else []
    return f"{option.help} [{', '.join(details)}]"


def build_parser(verb: str) -> Parser:
    """The parser of one verb: its own flags, then the flags of the settings it reads."""
    name = "embedfill" if command_name() == "embedfill" else "etl.py"
    parser = Parser(
        prog=name if verb == "run" else f"{name} {verb}",
        description=DESCRIPTIONS[verb],
        epilog=epilog(verb),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.verb = verb
    parser.add_argument("--version", action="version", version=f"embedfill {__version__}")
    own_actions: list[argparse.Action] = []
    parser.own_actions = own_actions

    def own(container: Any, *names: str, **options: Any) -> None:  # a parser or a group of it
        own_actions.append(container.add_argument(*names, **options))

    if verb == "search":
        own(parser, "query", help="the text to look for")
        own(parser, "--top", type=int, default=5, help="how many rows to show [default 5]")
    if verb == "embed":
        own(parser, "text", help="the text to embed")
    if verb in ("search", "status", "verify"):
        own(parser, "--json", action="store_true", help="print one JSON document instead of text")
    if verb == "db":
        own(parser, "action", choices=("url", "psql", "stop"), help="url, psql or stop")
        own(parser, "--force", action="store_true", help="with stop: end the open connections")
    if verb == "init":
        own(parser, "--type", choices=("vector", "halfvec"), default="vector", help="type of a new column")
        own(
            parser, "--restore-index", action="store_true", help="rebuild the vector indexes that --defer-index dropped"
        )
        own(
            parser,
            "--reset-column",
            action="store_true",
            help="set the embedding column to NULL in every row and forget what it held (needs --yes)",
        )
        own(parser, "--yes", action="store_true", help="confirm --reset-column")
    if verb == "verify":
        which = parser.add_mutually_exclusive_group()
        own(which, "--sample", type=_positive, default=100, help="random rows to check [default 100]")
        own(which, "--all", action="store_true", help="check every row that holds a vector")
        own(parser, "--fix", action="store_true", help="set the mismatched rows' embedding to NULL")
    if verb == "batches":
        own(parser, "action", choices=["cancel"], help="cancel: cancel the pending batches")
    if verb == "run":
        own(
            parser,
            "--batch-api",
            action="store_true",
            default=None,
            help="embed through OpenAI's Batch API at half the price, within 24 h [env ETL_BATCH_API]",
        )
        own(parser, "--no-wait", action="store_true", help="with --batch-api: submit, then exit 0 (for cron)")
    if verb == "demo":
        own(parser, "--rows", type=_positive, default=10_000, help="rows to generate [default 10000]")
    if verb == "init":
        track = parser.add_mutually_exclusive_group()
        own(
            track,
            "--track-changes",
            action="store_true",
            help="install a trigger that sets the vector to NULL when a text column changes, and notifies --follow",
        )
        own(track, "--untrack", action="store_true", help="remove that trigger (and only that)")
    if verb in ("run", "demo"):
        own(parser, "--limit", type=_positive, help="stop after N rows [default: all rows]")
        own(parser, "--retry-failed", action="store_true", help="take the rows in etl_failures again")
        own(
            parser,
            "--no-truncate",
            action="store_true",
            help="record over-long inputs as failed instead of truncating them",
        )
    if verb in ("run", "demo", "verify"):
        own(parser, "--dry-run", action="store_true", help="plan only: rows, tokens, cost, time; no API calls")
        own(
            parser,
            "--progress-interval",
            type=float,
            default=10.0,
            metavar="S",
            help="seconds between progress lines when stderr is not a terminal [default 10]",
        )
    parser.add_argument("--config", metavar="PATH", help="settings file [default: ./config.env when present]")
    group = parser.add_argument_group(
        f"settings {verb} reads (a flag wins over the environment, which wins over config.env)"
    )
    for option in OPTIONS:
        if verb not in option.verbs or not option.flag:
            continue
        if option.parse is boolean:
            group.add_argument(
                option.flag, dest=option.dest, action="store_const", const=True, help=_option_help(option)
            )
        else:
            group.add_argument(
                option.flag,
                dest=option.dest,
                type=_flag_type(option.parse, option.dest),
                metavar=option.metavar,
                help=_option_help(option),
            )
    return parser


def _flag_type(parse_text: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """argparse's type for a flag: the setting's own parser, its message on a bad value."""

    def parse(text: str) -> Any:
        try:
            return parse_text(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


_positive = _flag_type(positive_int, "N")


def split_verb(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The verb of a command line (`run` when it names none) and the arguments after it."""
    if argv and argv[0] in VERBS:
        return argv[0], list(argv[1:])
    return "run", list(argv)
