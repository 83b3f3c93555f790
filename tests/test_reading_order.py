"""The README's promise about the layout of the code: its reading-order table lists every module
with its current length, and every module imports only modules above it in that table, so data
flows one way and no import loop exists. Read from the source's import statements (nothing is
imported here), so an import tucked inside a function counts too."""

import ast
import glob
import os
import re

from conftest import ROOT


def reading_order():
    """[(file, lines the README gives)] of the README's reading-order table, top to bottom."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Reading order\n", 1)[1].split("\n## ", 1)[0]
    return [(path, int(n)) for path, n in re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", section, re.M)]


def module(path):
    """"nanosft/data.py" -> "nanosft.data", "train.py" -> "train"."""
    return path.removesuffix(".py").replace("/", ".")


def is_main_block(node):
    """`if __name__ == "__main__":`, where a module may forward `python -m` to a command-line module
    below it (an entry point, not a dependency)."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def nanosft_imports(path):
    """The nanosft modules a file imports, anywhere but in its __main__ block."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    nodes = [n for top in tree.body if not is_main_block(top) for n in ast.walk(top)]
    found = set()
    for n in nodes:
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
            [n.module] if isinstance(n, ast.ImportFrom) and n.module else []
        found |= {name for name in names if name == "nanosft" or name.startswith("nanosft.")}
    return found


def test_the_reading_order_lists_every_module_once():
    files = [path for path, _ in reading_order()]
    assert len(files) == len(set(files))
    modules = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "nanosft", "*.py"))} - {"nanosft/__init__.py"}
    assert modules <= set(files), f"not in the README's reading order: {sorted(modules - set(files))}"
    assert all(os.path.exists(os.path.join(ROOT, p)) for p in files)
    assert {"train.py", "chat.py"} <= set(files)


def test_every_module_imports_only_modules_above_it():
    files = [path for path, _ in reading_order()]
    position = {module(p): i for i, p in enumerate(files)}
    for i, path in enumerate(files):
        for name in sorted(nanosft_imports(path)):
            assert name in position, f"{path} imports {name}, which the reading order does not list"
            assert position[name] < i, f"{path} imports {name}, which comes after it in the reading order"


def test_the_readme_gives_each_file_its_length():
    for path, claimed in reading_order():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            lines = len(f.read().splitlines())
        assert abs(claimed - lines) <= max(10, lines // 10), f"{path}: the README says {claimed} lines, it has {lines}"


def test_the_import_check_sees_imports_inside_functions_and_skips_the_main_block(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("import os\nfrom nanosft.data import pack\n\ndef f():\n    import nanosft.model\n\n"
                                   "if __name__ == '__main__':\n    from nanosft.cli import data_main\n")
    monkeypatch.setattr("test_reading_order.ROOT", str(tmp_path))
    assert nanosft_imports("m.py") == {"nanosft.data", "nanosft.model"}
