"""`ban serve`: a small web app over one model, on Python's standard library HTTP server.

    server = make_server(App(predictor), "127.0.0.1", 8000)
    server.serve_forever()

GET  /                       the page (inline JS, no external resources)
GET  /api/images             {"total", "offset", "images": [{"image_id", "url"}], "uploads"}
GET  /api/images/<id>.png    the picture of an image of the dataset, or of an upload (id < 0)
POST /api/answer             {"image_id": int, "question": str, "top_k"?: int, "boxes"?: int}
POST /api/pictures           raw image bytes (Content-Type image/...) -> {"image_id", "url", ...}
GET  /openapi.json           the API description

The model is loaded once; a lock queues the requests to it (the model runs one question at a time,
the HTTP threads do the rest). Nothing from a request reaches the file system: image ids must be
integers of the feature files, and pictures are found from the id by `ban.viz.ImageFolder`.
Uploaded pictures are decoded and featurised in memory (`Predictor.add_picture`, with the backbone
that made the data's features) and kept in memory, the last `MAX_UPLOADS` of them.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
from collections import OrderedDict
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
MAX_UPLOAD = 8 * 1024 * 1024  # bytes of an uploaded picture
MAX_UPLOAD_PIXELS = 40_000_000  # width x height of an uploaded picture, before it is decoded
MAX_UPLOAD_SIDE = 1280  # longer side, in pixels, an upload is scaled down to (boxes are in these)
MAX_UPLOADS = 64  # uploaded pictures kept in memory; the oldest is forgotten
_IMAGE_PATH = re.compile(r"/api/images/(-?[0-9]{1,15})\.png")
_ID = re.compile(r"-?[0-9]{1,15}")


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
        self.uploads: OrderedDict[int, bytes] = OrderedDict()  # id (< 0) -> PNG, oldest first
        self._next_upload = -1
        self.upload_refusal = _upload_refusal(predictor.data_dir)

    def is_upload(self, image_id: int) -> bool:
        return image_id < 0 and image_id not in self._known

    def check_image(self, value) -> int:
        if isinstance(value, str) and _ID.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(HTTPStatus.BAD_REQUEST, "image_id must be an integer id of the dataset")
        if self.is_upload(value):
            with self._lock:
                if value in self.uploads:
                    return value
            raise ApiError(
                HTTPStatus.NOT_FOUND,
                f"unknown image: no uploaded picture {value} (the last {MAX_UPLOADS} are kept)",
            )
        if value not in self._known:
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown image: no image {value} in the dataset")
        return value

    def picture_png(self, image_id: int) -> bytes:
        """The PNG of a checked id: an upload's from memory, else the dataset's (cached)."""
        if self.is_upload(image_id):
            with self._lock:
                png = self.uploads.get(image_id)
            if png is None:
                raise ApiError(
                    HTTPStatus.NOT_FOUND, f"unknown image: no uploaded picture {image_id}"
                )
            return png
        return self.png(image_id)

    def _png(self, image_id: int) -> bytes:
        with self._lock:
            boxes = self.predictor.region_features(image_id)[2]
        return self.images.png_bytes(image_id, boxes)

    def uploads_info(self) -> dict:
        return {
            "enabled": self.upload_refusal is None,
            "max_bytes": MAX_UPLOAD,
            "reason": self.upload_refusal,
        }

    def add_picture(self, body: bytes) -> dict:
        """Decode an uploaded picture, featurise it like the data and keep it; its new id."""
        if self.upload_refusal is not None:
            raise ApiError(HTTPStatus.CONFLICT, self.upload_refusal)
        picture = decode_picture(body)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        with self._lock:
            image_id = self._next_upload
            while image_id in self._known:
                image_id -= 1
            try:
                self.predictor.add_picture(picture, image_id=image_id)
            except ValueError as error:  # e.g. the backbone file of the data is gone
                raise ApiError(HTTPStatus.CONFLICT, f"cannot featurise uploads: {error}") from None
            self._next_upload = image_id - 1
            self.uploads[image_id] = buffer.getvalue()
            while len(self.uploads) > MAX_UPLOADS:
                old, _ = self.uploads.popitem(last=False)
                self.predictor.remove_picture(old)
            regions = len(self.predictor.region_features(image_id)[0])
        return {
            "image_id": image_id,
            "url": f"/api/images/{image_id}.png",
            "width": picture.width,
            "height": picture.height,
            "regions": regions,
        }

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
            if self.is_upload(image_id) and image_id not in self.uploads:
                raise ApiError(  # forgotten since it was checked
                    HTTPStatus.NOT_FOUND, f"unknown image: no uploaded picture {image_id}"
                )
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
            "uploads": self.uploads_info(),
        }


def _upload_refusal(data_dir: Path) -> str | None:
    """None when the data's features came from pictures (`ban.images`), else why uploads fail."""
    from ban.images import extractor_info

    for path in sorted((Path(data_dir) / "features").glob("*.h5")):
        if extractor_info(path) is not None:
            return None
    return (
        "uploads need a model trained on picture features (`ban data from-images` or `ban "
        "features extract`): the features of this data were not made from pictures (e.g. the "
        "built-in benchmark's simulated detector), so a new picture cannot be featurised like them"
    )


def decode_picture(body: bytes):
    """An uploaded picture as RGB (upright by its EXIF orientation, the longer side at most
    `MAX_UPLOAD_SIDE`); ApiError 400 when it does not decode, 413 when it has too many pixels."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise ApiError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the picture is {image.width}x{image.height} pixels, at most "
                    f"{MAX_UPLOAD_PIXELS} in all",
                )
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as error:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"not a picture that decodes (PNG, JPEG, ...): {error}"
        ) from None
    if max(image.size) > MAX_UPLOAD_SIDE:
        image.thumbnail((MAX_UPLOAD_SIDE, MAX_UPLOAD_SIDE), Image.Resampling.LANCZOS)
    return image


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
            "/api/pictures": {
                "post": {
                    "summary": "upload a new picture to ask about",
                    "description": (
                        "The body is the picture's raw bytes (PNG, JPEG, or any format Pillow "
                        "decodes) with an image Content-Type (image/png, image/jpeg, ...), at most "
                        f"{MAX_UPLOAD} bytes (413 above, not read) and {MAX_UPLOAD_PIXELS} pixels. "
                        "It is turned upright by its EXIF orientation, scaled down to at most "
                        f"{MAX_UPLOAD_SIDE} pixels on its longer side, featurised with the "
                        "backbone that made the data's features, and kept in memory (the last "
                        f"{MAX_UPLOADS} uploads; ids are negative). Ask about it with POST "
                        "/api/answer and its image_id; boxes are in the pixels of the picture "
                        "served at its url. 409 when the data's features were not made from "
                        "pictures (see `uploads` in GET /api/images): uploads need a model "
                        "trained on picture features."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "the new picture",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Picture"}
                                }
                            },
                        },
                        "400": error,
                        "409": error,
                        "411": error,
                        "413": error,
                        "415": error,
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
                    "responses": {
                        "200": {
                            "description": "{total, offset, images, uploads: {enabled, "
                            "max_bytes, reason}} (reason: why uploads are refused, else null)"
                        },
                        "400": error,
                    },
                }
            },
            "/api/images/{image_id}.png": {
                "get": {
                    "summary": "the picture of an image of the dataset or of an upload (id < 0)",
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
                "Picture": {
                    "type": "object",
                    "properties": {
                        "image_id": {"type": "integer", "maximum": -1},
                        "url": {"type": "string"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "regions": {"type": "integer"},
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
            upload = self.app.is_upload(image_id)  # ids of uploads recur
            self._send(HTTPStatus.OK, self.app.picture_png(image_id), "image/png", not upload)
        else:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {url.path[:100]}")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/pictures":
            self._post_picture()
            return
        if path != "/api/answer":
            self.close_connection = True  # the body is not read
            raise ApiError(HTTPStatus.NOT_FOUND, "POST goes to /api/answer or /api/pictures")
        body = self._body(MAX_BODY)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {error}") from None
        self._json(HTTPStatus.OK, self.app.answer(payload))

    def _post_picture(self) -> None:
        if self.app.upload_refusal is not None:
            self.close_connection = True
            raise ApiError(HTTPStatus.CONFLICT, self.app.upload_refusal)
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not kind.startswith("image/"):
            self.close_connection = True
            raise ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "send the picture's bytes as the body with an image Content-Type (image/png, "
                f"image/jpeg, ...), not {kind or 'none'!r}",
            )
        body = self._body(MAX_UPLOAD)
        self._json(HTTPStatus.OK, self.app.add_picture(body))

    def _body(self, most: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length must be a number")
        if int(length) > most:
            self.close_connection = True
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {int(length)} bytes, at most {most}",
            )
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        return body


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
    predictor = Predictor.from_checkpoint(checkpoint, data, device)
    return App(predictor, ImageFolder.for_data(predictor.data_dir, images))
