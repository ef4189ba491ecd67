"""Every problem ``type`` the service can answer with resolves: followed from
a real server's response, it leads to the service's own ``/errors`` page and
an anchor there that explains it."""

from __future__ import annotations

import re
from urllib.parse import urldefrag, urljoin

import httpx
import pytest

from service.api.connections import REASONS
from service.api.problems import PROBLEM_TYPES, _HTTPProblem, problem_type
from service.errors import ServiceError


def every_slug() -> set[str]:
    """The slugs of every error class, of the HTTP-level problems and of the
    refusals the connection layer writes itself."""
    classes: list[type[ServiceError]] = [ServiceError]
    slugs = set()
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is not _HTTPProblem:
            slugs.add(cls.slug)
    slugs |= {_HTTPProblem(status, "", None).slug for status in (400, 404, 405, 418)}
    slugs |= {reason.decode().lower().replace(" ", "-") for reason in REASONS.values()}
    return slugs


def anchors(page: str) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page))


def follow(base: str, type_uri: str) -> tuple[str, str]:
    """The page a problem type names (resolved against the response's URL,
    as RFC 9457 says for a relative reference) and its fragment."""
    url, fragment = urldefrag(urljoin(base, type_uri))
    page = httpx.get(url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    return page.text, fragment


def test_every_type_the_service_can_emit_has_its_anchor(live_server: str) -> None:
    page = httpx.get(f"{live_server}/errors").text
    found = anchors(page)
    for slug in every_slug():
        assert slug in PROBLEM_TYPES, f"{slug}: no entry in PROBLEM_TYPES (the /errors page)"
        text, fragment = follow(f"{live_server}/v1/losses/mse_loss", problem_type(slug))
        assert fragment == slug and fragment in anchors(text)
    assert set(PROBLEM_TYPES) <= found


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/losses/focal_loss", {"input": [1.0]}, 404),
        ("POST", "/v1/losses/mse_loss", {"input": [1.0]}, 422),
        ("POST", "/v1/losses/mse_loss", "text/plain", 415),
        ("DELETE", "/v1/losses/mse_loss", None, 405),
        ("GET", "/v1/nowhere", None, 404),
    ],
)
def test_types_followed_from_real_responses(
    live_server: str, method: str, path: str, body: object, status: int
) -> None:
    if isinstance(body, str):  # a content type, with a body that is not JSON
        response = httpx.request(
            method, f"{live_server}{path}", content=b"x", headers={"content-type": body}
        )
    else:
        response = httpx.request(method, f"{live_server}{path}", json=body)
    assert response.status_code == status
    problem = response.json()
    text, fragment = follow(str(response.url), problem["type"])
    assert fragment in anchors(text)
    assert f"{status} " in text.split(f'id="{fragment}"')[1].split("</h2>")[0]


def test_a_trailing_slash_over_the_wire_is_no_redirect(live_server: str) -> None:
    response = httpx.post(
        f"{live_server}/v1/losses/cross_entropy/",
        json={"input": [[2, 1], [1, 2]], "target": [1, 0]},
    )
    assert response.status_code == 200 and response.json()["value"] == 1.31326162815094
