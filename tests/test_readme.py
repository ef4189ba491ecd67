"""The README's curl examples print what the service really returns."""

from __future__ import annotations

import json
import re
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
