"""The README's generated parts stay true: the method table comes from the registry."""
import re
from pathlib import Path

from peftlab.methods.table import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def block(name: str) -> str:
    text = README.read_text()
    found = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert found, f"README has no {name} block"
    return found.group(1).strip()


def test_method_table_is_generated_from_the_registry():
    assert block("methods") == markdown_table(), "run: peftlab methods --markdown, and paste it into README.md"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_versions_table_names_what_the_lock_pins_and_pyproject_allows():
    """The 'locked' column is constraints.txt; the 'lowest tested' one is pyproject.toml's lower bounds."""
    from packaging.version import Version

    root = README.parent
    pins = dict(line.split("==") for line in (root / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    project = (root / "pyproject.toml").read_text()
    bounds = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?>=([0-9.]+)"', project))
    bounds["python"] = re.search(r'requires-python = ">=([0-9.]+)"', project).group(1)
    rows = [line.split("|")[1:-1] for line in block("versions").splitlines()[2:]]
    assert [row[0].split()[0].lower() for row in rows] == ["python", "torch", "transformers", "peft", "bitsandbytes", "ray"]
    for name, locked, lowest, _ in ([cell.strip() for cell in row] for row in rows):
        name = name.split()[0].lower()
        if name == "python":
            assert f"Python {locked}," in (root / "constraints.txt").read_text(), "the lock's header names its Python"
            assert Version(lowest).release[:2] == Version(bounds["python"]).release[:2]
            continue
        assert locked == pins[name], f"README says {name} {locked} is locked; constraints.txt pins {pins[name]}"
        assert Version(lowest) == Version(bounds[name]), f"README's lowest {name} is {lowest}; pyproject.toml says >={bounds[name]}"
