"""The README's curl examples print what the service really returns."""

from __future__ import annotations

import doctest
import json
import re
import textwrap
from pathlib import Path

from fastapi.testclient import TestClient

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
EXAMPLE = re.compile(
    r"\$ curl -s -X POST localhost:8000(?P<path>\S+) \\\n.*?\n"
    r"\s+-d '(?P<body>.*?)'\n(?P<out>.*?)\n```",
    re.S,
)


def test_readme_examples_are_real(client: TestClient) -> None:
    examples = list(EXAMPLE.finditer(README))
    assert len(examples) >= 7
    for m in examples:
        response = client.post(m["path"], json=json.loads(m["body"]))
        assert response.status_code == 200, m["path"]
        assert response.json() == json.loads(m["out"]), m["path"]


def test_readme_httpx_example_is_real(live_server: str) -> None:
    """The plain-httpx caller of "Calling it from curl, Python and TypeScript",
    run against a real server."""
    start = README.index("\n## Calling it from curl, Python and TypeScript\n")
    section = README[start : README.index("\n## ", start + 1)]
    (block,) = re.findall(r"```pycon\n(.*?)```", section, re.S)
    test = doctest.DocTestParser().get_doctest(
        textwrap.dedent(block), {"url": live_server}, "README", "README.md", 0
    )
    runner = doctest.DocTestRunner()
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
    assert len(test.examples) >= 5
