"""`pip install .` gives an `embedfill` command that works from any directory, sql/ included.

Offline and fast (a few seconds): the wheel is built from a copy of the checkout without build
isolation, and installed without its dependencies into a fresh virtualenv that sees this one's
site-packages, the way `pip install .` or `pipx install .` would install it with them."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT

IGNORED = shutil.ignore_patterns(".git", ".pgdata", "__pycache__", "build", "dist", "*.egg-info", "v", "venv", ".ci")


def run(*args, cwd, env=None, timeout=120):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return result


def test_the_built_wheel_installs_a_working_embedfill_command(tmp_path, database_url):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), ".",
        cwd=source)  # fmt: skip
    (wheel,) = tmp_path.glob("embedfill-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    Path(purelib.stdout.strip(), "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the deps
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel),
        cwd=tmp_path)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor its copy
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ETL_", "OPENAI_", "PYTHON"))}
    command = str(venv / "bin" / "embedfill")
    version = run(command, "--version", cwd=elsewhere, env=env)
    from embedfill import __version__

    assert version.stdout.strip() == f"embedfill {__version__}"
    where = run(str(python), "-c", "import embedfill.db as d; print(d.__file__, d.SQL_DIR)", cwd=elsewhere, env=env)
    module, sql_dir = where.stdout.split()
    assert module.startswith(str(venv)) and sql_dir == str(Path(module).parent / "sql")

    demo = run(
        command, "demo", "--rows", "200", "--workers", "1", cwd=elsewhere, env={**env, "DATABASE_URL": database_url}
    )
    assert "summary embedded=200 failed=0" in demo.stdout
    assert 'next: embedfill search "김치찌개"' in demo.stdout  # it says its own name
    help_text = run(command, "search", "--help", cwd=elsewhere, env=env).stdout
    assert help_text.startswith("usage: embedfill search") and 'embedfill search "김치찌개" --top 5' in help_text
