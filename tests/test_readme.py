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
