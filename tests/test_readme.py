"""README: the two set-up commands come first, and every generated figure block equals what
`python -m bench.summary` renders from the committed result files (so the README cannot drift from them)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_generated_readme_blocks_equal_their_rendering_from_the_committed_results():
    from bench.summary import fill_readme, readme_blocks

    text = (ROOT / "README.md").read_text()
    blocks = readme_blocks()
    for name in blocks:
        assert f"<!-- {name}:begin" in text, name
    assert fill_readme(text, blocks) == text, "README is stale: run python -m bench.summary"
