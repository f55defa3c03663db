"""`ban serve`: the JSON API on good and bad input, on 127.0.0.1 with port 0 in a thread."""

import http.client
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from ban import serve
from tests.viz_run import first_question, tiny_viz_run


def start(app, **options):
    httpd = serve.make_server(app, "127.0.0.1", 0, quiet=True, **options)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run, data = tiny_viz_run(tmp_path_factory)
    httpd = start(serve.load_app(run, data))
    yield httpd, data
    httpd.shutdown()
    httpd.server_close()


def request(server, method, path, body=None, headers=None):
    host, port = server[0].server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if path == "/api/answer" and body is not None:
        headers.setdefault("Content-Type", "application/json")
    connection.request(method, path, body=body, headers=headers)
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
    assert status == 200 and len(listing["images"]) == 5 and listing["total"] == 16 + 6 + 2
    # the images with a picture (val and test: the training images have none) come first
    assert [i["image_id"] for i in listing["images"]] == [2_000_001 + k for k in range(5)]
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
        ({"image_id": "../../etc", "question": "how many?"}, 422, "integer"),
        ({"image_id": "../../etc/passwd", "question": "x"}, 422, "integer"),
        ({"image_id": None, "question": "x"}, 422, "integer"),
        ({"image_id": True, "question": "x"}, 422, "integer"),
        ({"image_id": 1.5, "question": "x"}, 422, "integer"),
        ({"question": "x"}, 422, "missing field: image_id"),
        ({"image_id": "IMG", "question": "   "}, 422, "question is empty"),
        ({"image_id": "IMG", "question": "why " * 100}, 422, "too long"),
        ({"image_id": "IMG", "question": 5}, 422, "question must be a string"),
        ({"image_id": "IMG", "question": "x", "top_k": 1000}, 422, "top_k"),
        ({"image_id": "IMG", "question": "x", "boxes": True}, 422, "boxes"),
        ({"image_id": "IMG", "question": "x", "path": "/etc"}, 422, "unknown field: path"),
        ([1, 2], 422, "JSON object"),
        ("{not json", 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        ("[" * 3000 + "]" * 3000, 400, "malformed JSON"),  # was 500 (RecursionError)
        ('{"a":' * 1300 + "1" + "}" * 1300, 400, "malformed JSON"),  # 1,300 deep: under 8 KiB
    ],
)
def test_bad_answer_requests(server, body, status, message):
    image_id = first_question(server[1])["image_id"]
    if isinstance(body, dict) and body.get("image_id") == "IMG":
        body = {**body, "image_id": image_id}
    got, reply = request(server, "POST", "/api/answer", body)
    assert got == status and message in reply["error"], reply


def test_bad_paths_and_bodies(server):
    for path in ["/api/images/../../etc/passwd", "/api/images/999999999.png",
                 "/api/images/%2e%2e%2fetc.png", "/api/images/1.jpg", "/nothing",
                 "/api/images/abc.png", "/docs"]:  # fmt: skip
        status, reply = request(server, "GET", path)
        assert status == 404 and "error" in reply, path
    for query in ["limit=x", "limit=1001", "offset=-1", "offset=999999"]:
        status, reply = request(server, "GET", f"/api/images?{query}")
        assert status == 422 and query.split("=")[0] in reply["error"], query
    big = json.dumps({"image_id": 1, "question": "x" * (serve.MAX_BODY + 10)})
    status, reply = request(server, "POST", "/api/answer", big)
    assert status == 413 and "at most" in reply["error"]
    status, reply = request(server, "POST", "/api/answer", b"")
    assert status == 400 and "malformed JSON" in reply["error"]
    reply, _ = raw(server, b"POST /api/answer HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length is required" in reply
    status, reply = request(server, "POST", "/api/other", {})
    assert status == 404
    # and it keeps serving
    entry = first_question(server[1])
    payload = {"image_id": entry["image_id"], "question": entry["question"]}
    status, body = request(server, "POST", "/api/answer", payload)
    assert status == 200 and body["answers"]


def test_wrong_methods_get_json_405(server):
    # was: GET on a POST route 404, PUT / DELETE an HTML 501 page
    for method, path, allowed in [("GET", "/api/answer", "POST"), ("PUT", "/api/answer", "POST"),
                                  ("DELETE", "/api/answer", "POST"), ("PUT", "/", "GET"),
                                  ("DELETE", "/api/images", "GET"), ("PATCH", "/api/pictures",
                                  "POST")]:  # fmt: skip
        status, reply = request(server, method, path, b"{}" if method != "GET" else None)
        assert status == 405 and "not allowed" in reply["error"] and allowed in reply["error"]
    status, reply = request(server, "PUT", "/nothing", b"{}")
    assert status == 404 and "no such page" in reply["error"]


def test_question_must_be_sent_as_json(server):
    entry = first_question(server[1])
    body = json.dumps({"image_id": entry["image_id"], "question": entry["question"]})
    for kind in ["text/plain", "application/x-www-form-urlencoded"]:
        status, reply = request(server, "POST", "/api/answer", body, {"Content-Type": kind})
        assert status == 415 and "application/json" in reply["error"]


def raw(server, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send `data` on a raw socket, then read until the server closes: (reply, seconds)."""
    host, port = server[0].server_address[:2]
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=wait) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server answered and closed before all was sent
            pass
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.perf_counter() - start


def test_chunked_body_over_the_limit(server):
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    head = (b"POST /api/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    reply, _ = raw(server, head + body)
    assert reply.startswith(b"HTTP/1.1 413") and b"over 8192 bytes" in reply


def test_malformed_http_gets_json_400(server):
    reply, _ = raw(server, b"GARBAGE\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"application/json" in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"].startswith("malformed HTTP")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000  # and never ended
    reply, _ = raw(server, huge)  # headers over 16 KiB (h11 counts what arrived incomplete)
    assert reply.startswith(b"HTTP/1.1 400") and b"malformed HTTP" in reply


@pytest.fixture(scope="module")
def impatient_server(server):
    httpd = start(server[0].app, read_timeout=0.5)
    yield httpd, server[1]
    httpd.shutdown()
    httpd.server_close()


def test_stalled_requests_are_cut_off(impatient_server):
    # was: no read timeout, stalled uploads held connections open forever
    stalled_headers = b"POST /api/answer HTTP/1.1\r\nHost: x\r\nContent-Len"
    reply, seconds = raw(impatient_server, stalled_headers)
    assert reply.startswith(b"HTTP/1.1 408") and b"headers did not arrive" in reply
    assert seconds < 5
    stalled_body = (b"POST /api/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"image_id\": 1")  # fmt: skip
    reply, seconds = raw(impatient_server, stalled_body)
    assert reply.startswith(b"HTTP/1.1 408") and b"the body did not arrive" in reply
    assert b"application/json" in reply and seconds < 5
    reply, seconds = raw(impatient_server, b"")  # a connection that sends nothing is closed
    assert reply == b"" and seconds < 5
    # many at once: all cut off, and it keeps serving
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda _: raw(impatient_server, stalled_body)[0], range(32)))
    assert all(r.startswith(b"HTTP/1.1 408") for r in replies)
    entry = first_question(impatient_server[1])
    payload = {"image_id": entry["image_id"], "question": entry["question"]}
    assert request(impatient_server, "POST", "/api/answer", payload)[0] == 200


def test_openapi_is_generated_from_the_models(server):
    status, spec = request(server, "GET", "/openapi.json")
    question = spec["paths"]["/api/answer"]["post"]["requestBody"]["content"]["application/json"]
    schema = question["schema"]
    assert schema["required"] == ["image_id", "question"]
    assert schema["properties"]["top_k"]["maximum"] == serve.MAX_TOP_K
    assert schema["properties"]["question"]["maxLength"] == serve.MAX_QUESTION
    responses = spec["paths"]["/api/answer"]["post"]["responses"]
    assert {"200", "400", "404", "413", "415", "422"} <= set(responses)
    assert "Answer" in spec["components"]["schemas"] and "Error" in spec["components"]["schemas"]


def test_page_offers_no_upload_when_uploads_are_off(server):
    status, page = request(server, "GET", "/")
    assert status == 200 and b"upload your own" not in page  # was offered on any data
    assert b'id="upload-row" hidden' in page


def test_port_in_use_is_one_line(server, capsys):
    from ban.cli import main

    host, port = server[0].server_address[:2]
    run = server[0].app.predictor.data_dir.parent / "run"
    assert main(["serve", str(run), "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port is in use" in err and "Traceback" not in err


BAD_FLAGS = [["--max-batch", "0"], ["--max-wait-ms", "-1"], ["--image-cache-mb", "-1"],
             ["--image-cache-mb", "nan"]]  # fmt: skip


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_serve_flags_out_of_range_are_one_line(server, capsys, flag):
    from ban.cli import main

    run = server[0].app.predictor.data_dir.parent / "run"
    assert main(["serve", str(run), "--port", "0", *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag[0] in err and "Traceback" not in err


def test_concurrent_requests_are_queued(server):
    entry = first_question(server[1])
    payload = {"image_id": entry["image_id"], "question": entry["question"]}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: request(server, "POST", "/api/answer", payload),
                                range(32)))  # fmt: skip
    assert all(status == 200 for status, _ in results)
    assert len({json.dumps(body["answers"]) for _, body in results}) == 1


def test_responses_are_not_held_back_by_nagle(server, monkeypatch):
    # was: the accepted sockets kept Nagle's algorithm (socket.create_server's have proto 0, on
    # which asyncio does not set TCP_NODELAY), so each response's body, written after its
    # headers, waited for the client's delayed ACK: 40 ms on every request
    no_delay = []  # read while the connection is open (it is closed after the request)
    made = serve.ReadTimeoutProtocol.connection_made

    def spy(protocol, transport):
        made(protocol, transport)
        sock = transport.get_extra_info("socket")
        no_delay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(serve.ReadTimeoutProtocol, "connection_made", spy)
    assert request(server, "GET", "/api/images?offset=0&limit=1")[0] == 200
    assert no_delay and all(no_delay)


# Uploads: a tiny model trained on the features of a small random conv backbone (`ban.data.images`)


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
    httpd = start(serve.load_app(run, data))
    yield httpd, data
    httpd.shutdown()
    httpd.server_close()


def test_upload_a_picture_and_ask_about_it(picture_server):
    status, listing = request(picture_server, "GET", "/api/images")
    assert status == 200 and listing["uploads"]["enabled"] and listing["uploads"]["reason"] is None
    status, page = request(picture_server, "GET", "/")
    assert b"upload your own" in page
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


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims `width x height` pixels (one row of data: it fails to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (1 + width))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "size",
    [(10_000, 5_000),  # over ours (40 Mpx), under Pillow's limits
     (10_000, 10_000),  # Pillow's DecompressionBombWarning (89 Mpx)
     (65_535, 65_535)],  # Pillow's DecompressionBombError (179 Mpx): was 400 with its message
)  # fmt: skip
def test_decompression_bombs_are_413(picture_server, size):
    status, reply = request(picture_server, "POST", "/api/pictures", _png_header(*size),
                            {"Content-Type": "image/png"})  # fmt: skip
    assert status == 413 and f"{serve.MAX_UPLOAD_PIXELS} in all" in reply["error"]
    assert "decompression bomb" not in reply["error"]


def test_bad_uploads(picture_server):
    png = {"Content-Type": "image/png"}
    status, reply = request(picture_server, "POST", "/api/pictures", b"not a picture at all", png)
    assert status == 400 and "not a picture that decodes" in reply["error"]
    assert "0x" not in reply["error"] and "BytesIO" not in reply["error"]  # was leaked
    status, reply = request(
        picture_server, "POST", "/api/pictures", b"\x89PNG\r\n\x1a\n broken", png
    )
    assert status == 400 and "not a picture that decodes" in reply["error"]
    status, reply = request(picture_server, "POST", "/api/pictures", b"", png)
    assert status == 400 and "the body is empty" in reply["error"]
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
    app = picture_server[0].app
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
