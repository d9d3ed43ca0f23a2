"""`etl.py demo`: a table of foods shaped like the seed's, generated fast with COPY, then backfilled."""

import itertools
import logging
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

import psycopg2
from psycopg2 import sql

from . import catalog, db, guard, schema
from .errors import DatabaseError

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

DEMO_TABLE = "embedfill_demo"
DEMO_MARKER = "embedfill demo table: recreated by python etl.py demo"
DEMO_TEXT_COLUMNS = ("name", "category", "description")

# fmt: off
DISHES = [
    ("김치찌개", "kimchi stew"), ("된장찌개", "soybean paste stew"), ("순두부찌개", "soft tofu stew"),
    ("부대찌개", "army base stew"), ("비빔밥", "mixed rice with vegetables"), ("돌솥비빔밥", "stone pot bibimbap"),
    ("불고기", "marinated grilled beef"), ("제육볶음", "spicy stir-fried pork"), ("닭갈비", "spicy stir-fried chicken"),
    ("삼겹살", "grilled pork belly"), ("갈비탕", "short rib soup"), ("설렁탕", "ox bone soup"),
    ("삼계탕", "ginseng chicken soup"), ("떡볶이", "spicy rice cakes"), ("김밥", "seaweed rice roll"),
    ("잡채", "glass noodles with vegetables"), ("냉면", "cold buckwheat noodles"), ("칼국수", "knife-cut noodle soup"),
    ("김치전", "kimchi pancake"), ("해물파전", "seafood scallion pancake"), ("계란말이", "rolled omelette"),
    ("미역국", "seaweed soup"), ("콩나물국", "bean sprout soup"), ("오징어볶음", "stir-fried squid"),
    ("고등어구이", "grilled mackerel"), ("감자조림", "braised potatoes"), ("두부조림", "braised tofu"),
    ("시금치나물", "seasoned spinach"), ("배추김치", "napa cabbage kimchi"), ("깍두기", "radish kimchi"),
    ("Caesar salad", "romaine, parmesan, croutons"), ("Margherita pizza", "tomato, mozzarella, basil"),
    ("Spaghetti carbonara", "egg, pecorino, guanciale"), ("Chicken curry", "spiced chicken in sauce"),
    ("Beef burger", "grilled patty in a bun"), ("Greek yogurt", "strained cultured milk"),
    ("Oatmeal", "rolled oats cooked in milk"), ("Miso soup", "fermented soybean broth"),
    ("Pad thai", "stir-fried rice noodles"), ("Fish and chips", "battered fish with fries"),
]
CATEGORIES = {
    "찌개": "찌개/stew", "탕": "탕/soup", "국": "국/soup", "볶음": "볶음/stir-fry", "구이": "구이/grill",
    "전": "전/pancake", "김치": "김치/kimchi", "조림": "조림/braise", "밥": "밥/rice", "면": "면/noodles",
}
STYLES = ["", "매운 ", "순한 ", "집밥 ", "Homemade ", "Spicy ", "Low-salt ", "Vegan "]
# fmt: on


def _category(name: str) -> str:
    for suffix, category in CATEGORIES.items():
        if suffix in name:
            return category
    return "기타/other"


def generate_rows(count: int, seed: int = 42) -> Iterator[str]:
    """Yield COPY text lines: name, category, description (nutrients per 100 g written as text)."""
    rng = random.Random(seed)
    for _ in range(count):
        name, english = DISHES[rng.randrange(len(DISHES))]
        style = STYLES[rng.randrange(len(STYLES))]
        kcal = rng.randint(40, 600)
        protein, fat, carbs = rng.uniform(0, 30), rng.uniform(0, 35), rng.uniform(0, 80)
        sodium = rng.randint(50, 1800)
        description = (
            f"{english}. 100 g당 열량 {kcal} kcal, 단백질 {protein:.1f} g, 지방 {fat:.1f} g, "
            f"탄수화물 {carbs:.1f} g, 나트륨 {sodium} mg"
        )
        yield f"{style}{name}\t{_category(name)}\t{description}\n"


def line_reader(lines: Iterator[str]) -> db.ChunkReader:
    """A file for COPY to read over a generator of text lines, 5,000 lines at a time."""
    return db.ChunkReader(iter(lambda: "".join(itertools.islice(lines, 5000)).encode("utf-8"), b""))


def marker(rows: int, dimensions: int) -> str:
    """The demo table's comment: says it is the demo's, and with which --rows and dimensions it was made."""
    return f"{DEMO_MARKER} (rows={rows}, vector({dimensions}))"


def prepare_table(settings: "Settings", rows: int, dimensions: int, out: TextIO) -> bool:
    """Resume an interrupted demo, or (re)create the demo's table; True when resumed.

    A table made by the demo with the same --rows and dimensions that still has rows without a
    vector, and whose column holds vectors of this run's provider and model (or none yet), is
    resumed: its rows are kept and the backfill takes the rest. Otherwise the table is recreated,
    but only a table that carries the demo's comment: a user's table of that name is left alone."""
    conn = db.connect(settings.database_url)
    where = f"database {conn.info.dbname} on {conn.info.host}:{conn.info.port}"
    try:
        with conn.cursor() as cur:
            cur.execute(db.load_sql("demo/demo_state"), {"name": DEMO_TABLE})
            exists, comment = cur.fetchone()
        conn.rollback()
        if exists and not (comment or "").startswith(DEMO_MARKER):
            raise DatabaseError(
                f"table {DEMO_TABLE} in {where} was not made by `etl.py demo`; "
                "the demo does not replace it: rename or drop it yourself, or use another database"
            )
        left = _rows_left(conn, settings) if exists and comment == marker(rows, dimensions) else 0
        if left:
            print(
                f"demo table {DEMO_TABLE} in {where}: resuming, {left} of {rows} rows still without a vector "
                f"(another --rows starts a new table)",
                file=out,
                flush=True,
            )
            return True
        _create(conn, rows, dimensions)
    except psycopg2.Error as error:
        raise DatabaseError(f"could not create the demo table: {db.first_line(error)}") from error
    finally:
        conn.close()
    print(f"demo table {DEMO_TABLE} in {where}: {rows} rows, embedding vector({dimensions})", file=out, flush=True)
    return False


def _rows_left(conn: db.Connection, settings: "Settings") -> int:
    """Rows of the demo's table still to embed by this run, or 0 when it cannot resume the table:
    a column that holds another provider's or model's vectors is started over."""
    target = catalog.inspect_target(conn, settings)
    held, wanted = guard.column_record(conn, target), guard.column_identity(settings, target)
    if held is not None and guard.differing(held, wanted):
        return 0
    return catalog.count_null(conn, target)


def _create(conn: db.Connection, rows: int, dimensions: int) -> None:
    names = {"table": sql.Identifier(DEMO_TABLE), "name": sql.Literal(DEMO_TABLE)}
    with conn.cursor() as cur:
        cur.execute(db.load_sql("table/extension"))
    schema.ensure(conn)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(db.load_sql("demo/demo_table")).format(
                dimensions=sql.Literal(dimensions), marker=sql.Literal(marker(rows, dimensions)), **names
            )
        )
        cur.copy_expert(sql.SQL(db.load_sql("demo/copy_rows")).format(**names), line_reader(generate_rows(rows)))
    conn.commit()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL(db.load_sql("demo/demo_index")).format(**names))
