"""The documentation site builds with mkdocs --strict (warnings are errors: broken links or
images, pages missing from the nav, docstrings mkdocstrings cannot render), and its API
reference covers every module."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parent.parent
NOT_IN_API = {"reftgraph.cli", "reftgraph.cli.main", "reftgraph.cli.spec", "reftgraph.__main__"}  # docs/cli.md


def load_extension():
    spec = importlib.util.spec_from_file_location("griffe_doctests", ROOT / "docs" / "griffe_doctests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    api = (tmp_path / "site" / "api" / "graph" / "index.html").read_text()
    assert "reftgraph.core.graph.Graph" in api or 'id="reftgraph.core.graph.Graph"' in api
    assert "&gt;&gt;&gt; " in api and "<blockquote>" not in api  # doctests shown as code, not quotes
    for page in ("concepts", "tutorials", "patching", "benchmarks"):
        assert (tmp_path / "site" / page / "index.html").is_file()


def test_api_reference_covers_every_module():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    package = ROOT / "reftgraph"
    modules = {"reftgraph." + ".".join(p.relative_to(package).with_suffix("").parts)
               for p in package.rglob("*.py") if p.stem != "__init__"}  # every module, every layer
    missing = modules - NOT_IN_API - documented
    assert not missing, f"add these modules to a page under docs/api/: {sorted(missing)}"


def test_doctests_become_code_blocks():
    fence = load_extension().fence_doctests
    text = "Make a :class:`Graph`.\n\n>>> g = Graph()\n>>> len(g)\n0\n\nThen ``run`` it.\n\n```\n>>> kept\n```"
    assert fence(text) == ("Make a `Graph`.\n\n```pycon\n>>> g = Graph()\n>>> len(g)\n0\n```\n\nThen ``run`` it."
                           "\n\n```\n>>> kept\n```")
    assert fence(">>> 1 + 1\n2") == "```pycon\n>>> 1 + 1\n2\n```"


def python_blocks(page: str) -> list:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)


def test_the_remote_page_runs(tmp_path):
    script = tmp_path / "remote_example.py"   # from a file: nnsight reads a trace's source
    script.write_text("\n".join(python_blocks("remote.md")))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "layer" in proc.stdout and "value" in proc.stdout


def test_the_several_processes_page_runs(tmp_path):
    (tmp_path / "train_two.py").write_text(python_blocks("distributed.md")[0])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train_two.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("2 processes, final loss") == 1
    from reftgraph.files import current_folder

    assert (current_folder(tmp_path / "trained") / "graph.json").is_file() and (tmp_path / "ckpt" / "epoch-2").is_dir()
