"""`ban serve`: the JSON API on good and bad input, on 127.0.0.1 with port 0 in a thread."""

import http.client
import io
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


# Uploads: a tiny model trained on the features of a small random conv backbone (`ban.images`)


def _picture(size=(60, 40), color="red", fmt="PNG") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(image).ellipse([w // 5, h // 5, 4 * w // 5, 4 * h // 5], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def picture_server(tmp_path_factory):
    import torch
    from torch import nn

    from ban.cli import main
    from ban.data.from_images import from_images

    root = tmp_path_factory.mktemp("pictures")
    folder = root / "images"
    folder.mkdir()
    questions, annotations = [], []
    for i, color in enumerate(["red", "blue", "red", "blue"], start=1):
        (folder / f"{i}.png").write_bytes(_picture((48 + 8 * i, 40), color))
        questions.append({"question_id": 10 * i, "image_id": i, "question": "What color is it?"})
        answers = [{"answer": color, "answer_confidence": "yes", "answer_id": k + 1}
                   for k in range(10)]  # fmt: skip
        annotations.append({"question_id": 10 * i, "image_id": i, "answers": answers,
                            "multiple_choice_answer": color, "answer_type": "other",
                            "question_type": "what color is the"})  # fmt: skip
    (root / "q.json").write_text(json.dumps({"questions": questions}))
    (root / "a.json").write_text(json.dumps({"annotations": annotations}))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "net.pt2"))
    data, run = root / "data", root / "run"
    from_images(folder, root / "q.json", data, root / "a.json", backbone=root / "net.pt2",
                size=64, grid=4, progress=False)  # fmt: skip
    tiny = ["--set", "model.hidden=16", "--set", "model.glimpses=1", "--batch-size", "2"]
    argv = ["train", "--data", str(data), "--max-steps", "1", "--eval-split", "none"]
    assert main([*argv, "--out", str(run), "--quiet", *tiny]) == 0
    httpd = serve.make_server(serve.load_app(run, data), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, data
    httpd.shutdown()
    httpd.server_close()


def test_upload_a_picture_and_ask_about_it(picture_server):
    status, listing = request(picture_server, "GET", "/api/images")
    assert status == 200 and listing["uploads"]["enabled"] and listing["uploads"]["reason"] is None
    status, spec = request(picture_server, "GET", "/openapi.json")
    assert "image Content-Type" in spec["paths"]["/api/pictures"]["post"]["description"]

    status, body = request(picture_server, "POST", "/api/pictures", _picture((90, 30), "blue"),
                           {"Content-Type": "image/png"})  # fmt: skip
    assert status == 200, body
    image_id = body["image_id"]
    assert image_id < 0 and body["url"] == f"/api/images/{image_id}.png"
    assert (body["width"], body["height"], body["regions"]) == (90, 30, 16)
    status, png = request(picture_server, "GET", body["url"])
    assert status == 200 and png.startswith(b"\x89PNG")
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (90, 30)

    for asked in (image_id, str(image_id)):
        payload = {"image_id": asked, "question": "what color is it?", "boxes": 10}
        status, answer = request(picture_server, "POST", "/api/answer", payload)
        assert status == 200 and answer["image_id"] == image_id and answer["answers"]
        boxes = [b["box"] for g in answer["boxes"] for b in g]
        assert len(boxes) == 10  # cells of a 4 x 4 grid over the 90 x 30 picture's pixels
        assert all(0 <= x1 < x2 <= 90 and 0 <= y1 < y2 <= 30 for x1, y1, x2, y2 in boxes)
        assert {(x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes} == {(22.5, 7.5)}

    # a JPEG too; each upload gets a new id
    jpeg = _picture((40, 40), "red", "JPEG")
    status, other = request(picture_server, "POST", "/api/pictures", jpeg,
                            {"Content-Type": "image/jpeg"})  # fmt: skip
    assert status == 200 and other["image_id"] < image_id

    # unknown upload ids are 404, and ids stay integers: nothing reaches the file system
    for path in ["/api/images/-999.png", "/api/images/-../etc.png", "/api/images/--1.png"]:
        status, reply = request(picture_server, "GET", path)
        assert status == 404 and "error" in reply, path
    status, reply = request(picture_server, "POST", "/api/answer",
                            {"image_id": -999, "question": "x"})  # fmt: skip
    assert status == 404 and "unknown image" in reply["error"]


def test_bad_uploads(picture_server):
    png = {"Content-Type": "image/png"}
    status, reply = request(picture_server, "POST", "/api/pictures", b"not a picture at all", png)
    assert status == 400 and "not a picture that decodes" in reply["error"]
    status, reply = request(
        picture_server, "POST", "/api/pictures", b"\x89PNG\r\n\x1a\n broken", png
    )
    assert status == 400 and "not a picture that decodes" in reply["error"]
    status, reply = request(picture_server, "POST", "/api/pictures", b"", png)
    assert status == 400
    # over the limit: refused from the headers, before the body is read
    host, port = picture_server[0].server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.putrequest("POST", "/api/pictures")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(serve.MAX_UPLOAD + 1))
    connection.endheaders()
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    assert response.status == 413 and f"at most {serve.MAX_UPLOAD}" in reply["error"]
    status, reply = request(picture_server, "POST", "/api/pictures", _picture(),
                            {"Content-Type": "application/json"})  # fmt: skip
    assert status == 415 and "image Content-Type" in reply["error"]
    status, reply = request(picture_server, "POST", "/api/pictures", None, png)
    assert status in (400, 411)


def test_uploads_are_bounded(picture_server, monkeypatch):
    monkeypatch.setattr(serve, "MAX_UPLOADS", 2)
    png = {"Content-Type": "image/png"}
    ids = [request(picture_server, "POST", "/api/pictures", _picture(), png)[1]["image_id"]
           for _ in range(3)]  # fmt: skip
    assert len(set(ids)) == 3
    assert request(picture_server, "GET", f"/api/images/{ids[0]}.png")[0] == 404
    assert request(picture_server, "GET", f"/api/images/{ids[2]}.png")[0] == 200
    app = picture_server[0].RequestHandlerClass.app
    assert len(app.uploads) == 2 and ids[0] not in app.predictor._pictures


def test_upload_refused_without_a_picture_backbone(server):
    status, listing = request(server, "GET", "/api/images?limit=1")
    assert status == 200 and not listing["uploads"]["enabled"]
    assert "model trained on picture features" in listing["uploads"]["reason"]
    status, reply = request(
        server, "POST", "/api/pictures", _picture(), {"Content-Type": "image/png"}
    )
    assert status == 409 and "uploads need a model trained on picture features" in reply["error"]
    status, reply = request(server, "GET", "/api/images/-1.png")
    assert status == 404
