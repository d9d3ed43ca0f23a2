"""docs/django.md, run: a Django app's table built by Django's own migrations (VectorExtension, a
VectorField(null=True)), filled by the tool through its command line, kept in sync after save() and
update(), and searched through the ORM with CosineDistance: the same rows and distances as
`etl.py search --json`. The app's files are the snippets of docs/django.md, as written there."""

import json
import re
import subprocess
import sys

import pytest

from embedfill.pgserver import shareable_url
from tests.conftest import ETL, ROOT, check_table

pytest.importorskip("django")

SETTINGS = """\
from database_settings import DATABASES  # noqa: F401 (docs/django.md)

SECRET_KEY = "test"
INSTALLED_APPS = ["menu"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
"""

DISHES = [
    ("김치찌개", "kimchi stew with pork"), ("된장찌개", "soybean paste stew"), ("Kimchi fried rice", "rice, kimchi"),
    ("Miso soup", "fermented soybean broth"), ("Caesar salad", "romaine, parmesan"), ("Pad thai", "rice noodles"),
    ("Beef burger", "grilled patty"), ("Oatmeal", "rolled oats"), ("Fish and chips", "battered fish"),
    ("Chicken curry", "spiced chicken"), ("Greek yogurt", "strained milk"), ("Bibimbap", "mixed rice"),
]  # fmt: skip

CREATE = """\
from menu.models import Dish

Dish.objects.bulk_create(Dish(name=name, description=description) for name, description in {dishes!r})
"""

ORM_NEAREST = """\
import json, sys
from nearest import nearest

rows = nearest(sys.argv[1], top=5, command=(sys.executable, {etl!r}))
print(json.dumps([[str(dish.pk), dish.distance] for dish in rows]))
"""


def doc_files():
    """{path: code} of the blocks that docs/django.md marks with <!-- file: PATH -->."""
    text = (ROOT / "docs" / "django.md").read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", text, re.S))


def test_a_django_apps_table_filled_by_the_tool_and_searched_through_the_orm(etl, db, tmp_path):
    files = doc_files()
    assert set(files) == {
        "menu/models.py", "menu/migrations/0001_vector_extension.py", "database_settings.py", "edit_dishes.py",
        "nearest.py",
    }  # fmt: skip
    project = tmp_path / "project"
    for path, code in {
        **files,
        "settings.py": SETTINGS,
        "menu/__init__.py": "",
        "menu/migrations/__init__.py": "",
    }.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(code)
    table = {"ETL_TABLE": "menu_dish", "ETL_TEXT_COLUMNS": "name,description"}
    env = etl.env(
        DATABASE_URL=shareable_url(etl.database_url), DJANGO_SETTINGS_MODULE="settings", PYTHONPATH=project, **table
    )

    def django(*args):
        result = subprocess.run([sys.executable, "-m", "django", *args], cwd=project, env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def script(code, *args):
        setup = "import django\ndjango.setup()\n"
        result = subprocess.run([sys.executable, "-c", setup + code, *args], cwd=project, env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    with db.cursor() as cur:
        cur.execute("DROP EXTENSION vector")  # the app's first migration creates it
    assert "Create model Dish" in django("makemigrations", "menu")
    django("migrate")
    script(CREATE.format(dishes=DISHES))
    with db.cursor() as cur:
        cur.execute("SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
                    "WHERE attrelid = 'menu_dish'::regclass AND attname = 'embedding'")  # fmt: skip
        assert cur.fetchone() == ("vector(1536)", False)

    for args in (["init"], []):  # the tool, as a user runs it
        result = etl.run(*args, **table)
        assert result.returncode == 0, result.stderr
    embedded, null = check_table(db, table="menu_dish", dims=1536, columns=("name", "description"))
    assert len(embedded) == len(DISHES) and null == []

    query = "kimchi stew"
    found = json.loads(etl.run("search", query, "--top", "5", "--json", **table).stdout)
    orm = json.loads(script(ORM_NEAREST.format(etl=ETL), query))
    assert [row_id for row_id, _ in orm] == [row["id"] for row in found["rows"]]
    assert [distance for _, distance in orm] == pytest.approx([row["distance"] for row in found["rows"]], abs=1e-6)

    # save() and update() of a text field set the vector to NULL (the trigger); the next run embeds them.
    assert etl.run("init", "--track-changes", **table).returncode == 0
    script(files["edit_dishes.py"])
    with db.cursor() as cur:
        cur.execute("SELECT id FROM menu_dish WHERE embedding IS NULL ORDER BY id")
        assert cur.fetchall() == [(3,), (4,)]
    again = etl.run(**table)
    assert again.returncode == 0 and "summary embedded=2 failed=0" in again.stdout
    embedded, null = check_table(db, table="menu_dish", dims=1536, columns=("name", "description"))
    assert len(embedded) == len(DISHES) and null == []
