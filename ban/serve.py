"""`ban serve`: a small web app over one model, on Python's standard library HTTP server.

    server = make_server(App(predictor), "127.0.0.1", 8000)
    server.serve_forever()

GET  /                       the page (inline JS, no external resources)
GET  /api/images             {"total", "offset", "images": [{"image_id", "url"}]}  ?offset=&limit=
GET  /api/images/<id>.png    the picture of an image of the dataset (ids of the feature files only)
POST /api/answer             {"image_id": int, "question": str, "top_k"?: int, "boxes"?: int}
GET  /openapi.json           the API description

The model is loaded once; a lock queues the requests to it (the model runs one question at a time,
the HTTP threads do the rest). Nothing from a request reaches the file system: image ids must be
integers of the feature files, and pictures are found from the id by `ban.viz.ImageFolder`.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ban.predict import Predictor
from ban.viz import GLIMPSE_COLORS, ImageFolder

MAX_BODY = 8 * 1024  # bytes of a request body
MAX_QUESTION = 300  # characters of a question
MAX_TOP_K = 20
MAX_BOXES = 10
MAX_LIMIT = 1000  # images per /api/images page
_IMAGE_PATH = re.compile(r"/api/images/([0-9]{1,15})\.png")


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class App:
    """The model, the dataset's image ids and pictures; `answer` is safe to call from threads."""

    def __init__(self, predictor: Predictor, images: ImageFolder | None = None) -> None:
        from ban.data.features import FeatureStore

        self.predictor = predictor
        self.images = images or ImageFolder.for_data(predictor.data_dir)
        ids: set[int] = set()
        for path in sorted((predictor.data_dir / "features").glob("*.h5")):
            ids.update(FeatureStore(path).image_ids())
        if not ids:
            raise FileNotFoundError(f"no image features in {predictor.data_dir / 'features'}")
        self.image_ids = sorted(ids)
        self._known = frozenset(ids)
        self._lock = threading.Lock()
        self.png = lru_cache(maxsize=512)(self._png)

    def check_image(self, value) -> int:
        if isinstance(value, str) and value.isdigit() and len(value) <= 15:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(HTTPStatus.BAD_REQUEST, "image_id must be an integer id of the dataset")
        if value not in self._known:
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown image: no image {value} in the dataset")
        return value

    def _png(self, image_id: int) -> bytes:
        with self._lock:
            boxes = self.predictor.region_features(image_id)[2]
        return self.images.png_bytes(image_id, boxes)

    def answer(self, payload) -> dict:
        if not isinstance(payload, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = set(payload) - {"image_id", "question", "top_k", "boxes"}
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown fields: {', '.join(sorted(unknown))}")
        if "image_id" not in payload:
            raise ApiError(HTTPStatus.BAD_REQUEST, "missing field: image_id")
        image_id = self.check_image(payload["image_id"])
        question = payload.get("question")
        if not isinstance(question, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, "question must be a string")
        question = question.strip()
        if not question:
            raise ApiError(HTTPStatus.BAD_REQUEST, "question is empty")
        if len(question) > MAX_QUESTION:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                f"question is too long: {len(question)} characters, at most {MAX_QUESTION}",
            )
        top_k = _bounded(payload, "top_k", 5, MAX_TOP_K)
        boxes = _bounded(payload, "boxes", 3, MAX_BOXES)
        with self._lock:
            result = self.predictor(question, image_id, top_k=top_k, top_boxes=boxes)
        out = result.to_dict()
        out["colors"] = [GLIMPSE_COLORS[g % len(GLIMPSE_COLORS)] for g in range(len(result.boxes))]
        return out

    def list_images(self, query: dict[str, list[str]]) -> dict:
        offset = _query_int(query, "offset", 0, len(self.image_ids))
        limit = _query_int(query, "limit", 100, MAX_LIMIT)
        page = self.image_ids[offset : offset + limit]
        return {
            "total": len(self.image_ids),
            "offset": offset,
            "images": [{"image_id": i, "url": f"/api/images/{i}.png"} for i in page],
        }


def _bounded(payload: dict, key: str, default: int, most: int) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer from 1 to {most}")
    return value


def _query_int(query: dict[str, list[str]], key: str, default: int, most: int) -> int:
    values = query.get(key)
    if not values:
        return default
    if not values[0].isdigit() or int(values[0]) > most:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer from 0 to {most}")
    return int(values[0])


def openapi() -> dict:
    error = {
        "description": "a bad request",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "ban serve", "version": "1", "description": "BAN VQA answers"},
        "paths": {
            "/api/answer": {
                "post": {
                    "summary": "answer a question about an image of the dataset",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Question"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "top answers and the most attended boxes per glimpse",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Answer"}
                                }
                            },
                        },
                        "400": error,
                        "404": error,
                        "411": error,
                        "413": error,
                    },
                }
            },
            "/api/images": {
                "get": {
                    "summary": "the image ids of the dataset, a page at a time",
                    "parameters": [
                        {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "maximum": MAX_LIMIT},
                        },
                    ],
                    "responses": {"200": {"description": "{total, offset, images}"}, "400": error},
                }
            },
            "/api/images/{image_id}.png": {
                "get": {
                    "summary": "the picture of an image of the dataset",
                    "parameters": [
                        {
                            "name": "image_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "PNG", "content": {"image/png": {}}},
                        "404": error,
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Question": {
                    "type": "object",
                    "required": ["image_id", "question"],
                    "additionalProperties": False,
                    "properties": {
                        "image_id": {"type": "integer"},
                        "question": {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
                        "boxes": {"type": "integer", "minimum": 1, "maximum": MAX_BOXES},
                    },
                },
                "Answer": {
                    "type": "object",
                    "properties": {
                        "question": {"type": "string"},
                        "image_id": {"type": "integer"},
                        "tokens": {"type": "array", "items": {"type": "string"}},
                        "answers": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "answer": {"type": "string"},
                                    "score": {"type": "number"},
                                },
                            },
                        },
                        "boxes": {
                            "type": "array",
                            "description": "per glimpse, best first: {index, box [x1,y1,x2,y2] "
                            "in pixels, weight}",
                            "items": {"type": "array", "items": {"type": "object"}},
                        },
                        "colors": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            }
        },
    }


def _page() -> bytes:
    html = resources.files("ban").joinpath("static/index.html").read_text(encoding="utf-8")
    return html.replace("__MAX_QUESTION__", str(MAX_QUESTION)).encode("utf-8")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ban-serve"
    app: App  # set by make_server
    quiet = False

    def log_message(self, format, *args) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _handle(self, route) -> None:
        try:
            route()
        except ApiError as error:
            self._json(error.status, {"error": error.message})
        except Exception as error:  # the server keeps serving; the client gets a 500
            self.log_error("internal error: %r", error)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE, "text/html; charset=utf-8")
        elif url.path == "/openapi.json":
            self._json(HTTPStatus.OK, OPENAPI)
        elif url.path == "/api/images":
            self._json(HTTPStatus.OK, self.app.list_images(parse_qs(url.query)))
        elif url.path.startswith("/api/images/"):
            match = _IMAGE_PATH.fullmatch(url.path)
            if match is None:
                raise ApiError(HTTPStatus.NOT_FOUND, "unknown image: expected /api/images/<id>.png")
            image_id = self.app.check_image(int(match.group(1)))
            self._send(HTTPStatus.OK, self.app.png(image_id), "image/png", cache=True)
        else:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {url.path[:100]}")

    def _post(self) -> None:
        if urlsplit(self.path).path != "/api/answer":
            self.close_connection = True  # the body is not read
            raise ApiError(HTTPStatus.NOT_FOUND, "POST goes to /api/answer")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length must be a number")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {int(length)} bytes, at most {MAX_BODY}",
            )
        body = self.rfile.read(int(length))
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {error}") from None
        self._json(HTTPStatus.OK, self.app.answer(payload))


PAGE = _page()
OPENAPI = openapi()


def make_server(
    app: App, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> ThreadingHTTPServer:
    """A threading HTTP server for `app` (port 0: any free port; see `server.server_address`)."""
    handler = type("BoundHandler", (Handler,), {"app": app, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def load_app(
    checkpoint: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    device: str = "cpu",
) -> App:
    """Load the model once: a checkpoint file or run directory, on the run's data by default."""
    from ban import engine

    path, run_config = engine.resolve_checkpoint(checkpoint)
    model = engine.load_checkpoint(path, device)
    predictor = Predictor(
        model, data=data or (run_config.data if run_config else None), device=device
    )
    return App(predictor, ImageFolder.for_data(predictor.data_dir, images))
