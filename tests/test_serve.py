"""`ban serve`: the JSON API on good and bad input, on 127.0.0.1 with port 0 in a thread."""

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ban import serve
from tests.viz_run import first_question, tiny_viz_run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run, data = tiny_viz_run(tmp_path_factory)
    app = serve.load_app(run, data)
    httpd = serve.make_server(app, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, data
    httpd.shutdown()
    httpd.server_close()


def request(server, method, path, body=None, headers=None):
    host, port = server[0].server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(data) if kind.startswith("application/json") else data


def test_answer_and_images(server):
    entry = first_question(server[1])
    status, body = request(server, "POST", "/api/answer",
                           {"image_id": entry["image_id"], "question": entry["question"],
                            "top_k": 3})  # fmt: skip
    assert status == 200
    assert len(body["answers"]) == 3 and body["image_id"] == entry["image_id"]
    scores = [a["score"] for a in body["answers"]]
    assert scores == sorted(scores, reverse=True)
    assert len(body["boxes"]) == len(body["colors"]) == 2
    assert all(len(b["box"]) == 4 for g in body["boxes"] for b in g)

    status, listing = request(server, "GET", "/api/images?limit=5")
    assert status == 200 and len(listing["images"]) == 5 and listing["total"] >= 5
    status, png = request(server, "GET", listing["images"][0]["url"])
    assert status == 200 and png.startswith(b"\x89PNG")
    status, page = request(server, "GET", "/")
    assert status == 200 and b"/api/answer" in page and b"http" not in page.split(b"<script")[1]
    status, spec = request(server, "GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.") and "/api/answer" in spec["paths"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"image_id": 999999999, "question": "how many?"}, 404, "unknown image"),
        ({"image_id": "../../etc", "question": "how many?"}, 400, "integer"),
        ({"image_id": "../../etc/passwd", "question": "x"}, 400, "integer"),
        ({"image_id": None, "question": "x"}, 400, "integer"),
        ({"question": "x"}, 400, "missing field: image_id"),
        ({"image_id": "IMG", "question": "   "}, 400, "question is empty"),
        ({"image_id": "IMG", "question": "why " * 100}, 400, "too long"),
        ({"image_id": "IMG", "question": 5}, 400, "question must be a string"),
        ({"image_id": "IMG", "question": "x", "top_k": 1000}, 400, "top_k"),
        ({"image_id": "IMG", "question": "x", "path": "/etc"}, 400, "unknown fields"),
        ([1, 2], 400, "JSON object"),
        ("{not json", 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
    ],
)
def test_bad_answer_requests(server, body, status, message):
    image_id = first_question(server[1])["image_id"]
    if isinstance(body, dict) and body.get("image_id") == "IMG":
        body = {**body, "image_id": image_id}
    got, reply = request(server, "POST", "/api/answer", body)
    assert got == status and message in reply["error"]


def test_bad_paths_and_bodies(server):
    for path in ["/api/images/../../etc/passwd", "/api/images/999999999.png",
                 "/api/images/%2e%2e%2fetc.png", "/api/images/1.jpg", "/nothing"]:  # fmt: skip
        status, reply = request(server, "GET", path)
        assert status == 404 and "error" in reply, path
    status, reply = request(server, "GET", "/api/images?limit=x")
    assert status == 400 and "limit" in reply["error"]
    big = json.dumps({"image_id": 1, "question": "x" * (serve.MAX_BODY + 10)})
    status, reply = request(server, "POST", "/api/answer", big)
    assert status == 413 and "at most" in reply["error"]
    status, reply = request(server, "POST", "/api/answer", None)  # no Content-Length
    assert status in (400, 411)
    status, reply = request(server, "POST", "/api/other", {})
    assert status == 404
    # and it keeps serving
    entry = first_question(server[1])
    payload = {"image_id": entry["image_id"], "question": entry["question"]}
    status, body = request(server, "POST", "/api/answer", payload)
    assert status == 200 and body["answers"]


def test_concurrent_requests_are_queued(server):
    entry = first_question(server[1])
    payload = {"image_id": entry["image_id"], "question": entry["question"]}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: request(server, "POST", "/api/answer", payload),
                                range(32)))  # fmt: skip
    assert all(status == 200 for status, _ in results)
    assert len({json.dumps(body["answers"]) for _, body in results}) == 1
