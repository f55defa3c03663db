"""`ban serve`: a small web app over one model, on FastAPI + uvicorn.

    server = make_server(load_app("runs/x"), "127.0.0.1", 8000)
    server.serve_forever()

GET  /                       the page (inline JS, no external resources)
GET  /api/images             {"total", "offset", "images": [{"image_id", "url"}], "uploads"}
GET  /api/images/<id>.png    the picture of an image of the dataset, or of an upload (id < 0)
POST /api/answer             {"image_id": int, "question": str, "top_k"?: int, "boxes"?: int}
POST /api/pictures           raw image bytes (Content-Type image/...) -> {"image_id", "url", ...}
GET  /openapi.json           the API description, generated from the pydantic models below

The model is loaded once and runs on its own thread (`Batcher`): the questions that arrive while
it is busy are answered together in its next forward pass (at most `MAX_BATCH`), so throughput
rises with the number of clients while a lone question is answered at once. All of torch's work
(loading, answering, featurising uploads) runs on that one thread: each thread that calls into
torch gets its own OpenMP team, and with more teams than cores they stop spinning between
operations and wake by futex, which made each forward about 1.8x slower. Every error is a
JSON `{"error": "..."}`. Bodies are read by `RequestLimits` before any route sees them, bounded
in size (413) and in time (408), as are the request's headers (`ReadTimeoutProtocol`), so a
stalled client cannot hold a connection. Nothing from a request reaches the file system: image
ids must be integers of the feature files, and pictures are found from the id by
`ban.viz.ImageFolder`. Uploaded pictures are decoded and featurised in memory
(`Predictor.add_picture`, with the backbone that made the data's features) and kept in memory,
the last `MAX_UPLOADS` of them.

Why it is long (about 890 lines): the limits, the request and response models, the batcher, the
read timeouts and the error bodies of one hardened server, which belong together.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import queue
import re
import socket
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated

import h11
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ban.data.features import FeatureStore
from ban.data.images import extractor_info
from ban.predict import (
    IMAGE_CACHE_BYTES,
    MAX_QUESTION,
    Predictor,
    QuestionError,
    check_question,
)
from ban.viz import GLIMPSE_COLORS, ImageFolder

MAX_BODY = 8 * 1024  # bytes of a request body (but an upload's)
MAX_TOP_K = 20
MAX_BOXES = 10
MAX_LIMIT = 1000  # images per /api/images page
MAX_UPLOAD = 8 * 1024 * 1024  # bytes of an uploaded picture
MAX_UPLOAD_PIXELS = 40_000_000  # width x height of an uploaded picture, before it is decoded
MAX_UPLOAD_SIDE = 1280  # longer side, in pixels, an upload is scaled down to (boxes are in these)
MAX_UPLOADS = 64  # uploaded pictures kept in memory; the oldest is forgotten
MAX_BATCH = 16  # questions answered together in one forward pass
MAX_WAIT = 0.01  # seconds a forward may wait for more questions, under load only
READ_TIMEOUT = 30.0  # seconds for a request's headers, and again for its body, to arrive
MAX_HEADER = 16 * 1024  # bytes of a request line and headers
_ID = re.compile(r"-?[0-9]{1,15}")
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # `<_io.BytesIO object at 0x...>` in messages


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# The API's bodies. The OpenAPI description is generated from these.


def _image_id(value):
    # An id of the dataset or of an upload: an integer, or its decimal string (never a path).
    if isinstance(value, str) and _ID.fullmatch(value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("image_id", "image_id must be an integer id of the dataset")
    return value


def _bounded(key: str, most: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise PydanticCustomError(key, f"{key} must be an integer from 1 to {most}")
        return value

    return BeforeValidator(check)


def _question(value):
    """The one question rule of the command line and `Predictor` (`ban.predict.check_question`)."""
    try:
        return check_question(value)
    except QuestionError as error:
        raise PydanticCustomError("question", str(error)) from None


class Question(BaseModel):
    """A question about an image of the dataset (or an upload, id < 0)."""

    model_config = ConfigDict(extra="forbid")
    image_id: Annotated[int, BeforeValidator(_image_id)] = Field(
        description="an image id of the dataset's feature files, or of an upload (negative); "
        "a decimal string is accepted"
    )
    question: Annotated[str, BeforeValidator(_question)] = Field(
        min_length=1, max_length=MAX_QUESTION, description="leading and trailing spaces dropped"
    )
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K), _bounded("top_k", MAX_TOP_K)] = 5
    boxes: Annotated[int, Field(ge=1, le=MAX_BOXES), _bounded("boxes", MAX_BOXES)] = 3


class ScoredAnswer(BaseModel):
    answer: str
    score: float = Field(description="sigmoid score")


class Box(BaseModel):
    index: int = Field(description="row of the box in the image's features")
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the served picture")
    weight: float = Field(description="attention mass of the box in this glimpse")


class Answer(BaseModel):
    question: str
    image_id: int
    tokens: list[str] = Field(description="the question as the model reads it")
    answers: list[ScoredAnswer] = Field(description="top_k answers, best first")
    boxes: list[list[Box]] = Field(description="per glimpse, the most attended boxes, best first")
    colors: list[str] = Field(description="a colour per glimpse, as the page draws them")


class Picture(BaseModel):
    image_id: int = Field(le=-1, description="the id to ask about")
    url: str
    width: int
    height: int
    regions: int = Field(description="regions (boxes) of its features")


class ImageItem(BaseModel):
    image_id: int
    url: str


class Uploads(BaseModel):
    enabled: bool
    max_bytes: int
    reason: str | None = Field(description="why uploads are refused, else null")


class ImageList(BaseModel):
    total: int
    offset: int
    images: list[ImageItem]
    uploads: Uploads


class Error(BaseModel):
    error: str = Field(description="what was wrong, naming the field or limit")


class App:
    """The model, the dataset's image ids and pictures; `answer` is safe to call from threads."""

    def __init__(
        self,
        predictor: Predictor,
        images: ImageFolder | None = None,
        max_batch: int = MAX_BATCH,
        max_wait: float = MAX_WAIT,
        batcher: Batcher | None = None,
    ) -> None:
        """`batcher`: the model thread that `predictor` was made on (see `load_app`); when
        None, a new one bounded by `max_batch` and `max_wait`."""
        self.predictor = predictor
        self.images = images or ImageFolder.for_data(predictor.data_dir)
        ids: set[int] = set()
        for path in sorted((predictor.data_dir / "features").glob("*.h5")):
            ids.update(FeatureStore(path).image_ids())
        if not ids:
            raise FileNotFoundError(f"no image features in {predictor.data_dir / 'features'}")
        # Images with a picture first (the built-in benchmark draws only its val and test images).
        pictured = self.images.pictured(ids)
        self.image_ids = sorted(ids, key=lambda i: (i not in pictured, i))
        self._known = frozenset(ids)
        self._lock = threading.Lock()
        self.png = lru_cache(maxsize=512)(self._png)
        self.uploads: OrderedDict[int, bytes] = OrderedDict()  # id (< 0) -> PNG, oldest first
        self._next_upload = -1
        self.upload_refusal = _upload_refusal(predictor.data_dir)
        self.batcher = batcher or Batcher(max_batch=max_batch, max_wait=max_wait)
        self.batcher.answer = self._answer_batch

    def is_upload(self, image_id: int) -> bool:
        return image_id < 0 and image_id not in self._known

    def check_image(self, image_id: int) -> int:
        # The event loop calls this: it reads `uploads` without the lock, which the model holds
        # for a whole forward (a dict lookup is atomic; the batcher checks again under the lock).
        if self.is_upload(image_id):
            if image_id in self.uploads:
                return image_id
            raise ApiError(
                404,
                f"unknown image: no uploaded picture {image_id} (the last {MAX_UPLOADS} are kept)",
            )
        if image_id not in self._known:
            raise ApiError(404, f"unknown image: no image {image_id} in the dataset")
        return image_id

    def picture_png(self, image_id: int) -> bytes:
        """The PNG of a checked id: an upload's from memory, else the dataset's (cached)."""
        if self.is_upload(image_id):
            png = self.uploads.get(image_id)
            if png is None:
                raise ApiError(404, f"unknown image: no uploaded picture {image_id}")
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
        """Decode an uploaded picture, featurise it like the data (on the model thread) and
        keep it; its new id."""
        if self.upload_refusal is not None:
            raise ApiError(409, self.upload_refusal)
        picture = decode_picture(body)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return self.batcher.call(self._keep_picture, picture, buffer.getvalue()).result()

    def _keep_picture(self, picture, png: bytes) -> dict:
        with self._lock:
            image_id = self._next_upload
            while image_id in self._known:
                image_id -= 1
            try:
                self.predictor.add_picture(picture, image_id=image_id)
            except ValueError as error:  # e.g. the backbone file of the data is gone
                raise ApiError(409, f"cannot featurise uploads: {_clean(error)}") from None
            self._next_upload = image_id - 1
            self.uploads[image_id] = png
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

    def submit(self, question: Question) -> Future:
        """Queue a question for the model: a future of its answer (a dict of `Answer`)."""
        self.check_image(question.image_id)
        return self.batcher.submit(question)

    def answer(self, question: Question) -> dict:
        return self.submit(question).result()

    def _answer_batch(self, questions: list[Question]) -> list[dict | Exception]:
        """Answers of the batcher's questions, in one forward (an error for each that fails)."""
        with self._lock:
            out: list[dict | Exception | None] = [None] * len(questions)
            ready = []
            for k, q in enumerate(questions):
                if self.is_upload(q.image_id) and q.image_id not in self.uploads:  # forgotten
                    out[k] = ApiError(404, f"unknown image: no uploaded picture {q.image_id}")
                else:
                    ready.append(k)
            try:
                results = self.predictor.answer_batch(
                    [questions[k].question for k in ready],
                    [questions[k].image_id for k in ready],
                    [questions[k].top_k for k in ready],
                    [questions[k].boxes for k in ready],
                )
            except Exception:  # one at a time, so that only the question at fault fails
                results = []
                for k in ready:
                    q = questions[k]
                    try:
                        results.append(self.predictor(q.question, q.image_id, q.top_k, q.boxes))
                    except Exception as error:
                        results.append(error)
        for k, result in zip(ready, results, strict=True):
            out[k] = result if isinstance(result, Exception) else self._answer_dict(result)
        return out

    @staticmethod
    def _answer_dict(result) -> dict:
        out = result.to_dict()
        out["colors"] = [GLIMPSE_COLORS[g % len(GLIMPSE_COLORS)] for g in range(len(result.boxes))]
        return out

    def list_images(self, offset: int, limit: int) -> dict:
        if offset > len(self.image_ids):
            raise ApiError(422, f"offset must be an integer from 0 to {len(self.image_ids)}")
        page = self.image_ids[offset : offset + limit]
        return {
            "total": len(self.image_ids),
            "offset": offset,
            "images": [{"image_id": i, "url": f"/api/images/{i}.png"} for i in page],
            "uploads": self.uploads_info(),
        }


class _Call:
    def __init__(self, function, args) -> None:
        self.function, self.args = function, args


class Batcher:
    """The model thread. Runs `answer(list of questions) -> list of answers or exceptions` in
    batches: the questions that arrived while the model was busy go together into its next
    forward, at most `max_batch` of them (1: one question at a time). Under load a forward also
    waits up to `max_wait` seconds for more, until it holds as many questions as the largest of
    the last `RECENT` forwards: the clients just answered are about to ask again, and without
    the wait the batches alternate full and nearly empty; with four clients it does not wait for
    a sixteenth. A lone question after a quiet spell goes at once. `call` runs any other function
    on the same thread, in turn."""

    RECENT = 4  # forwards whose size tells how many clients are asking

    def __init__(self, answer=None, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(
                f"max_batch must be >= 1 and max_wait >= 0, got {max_batch}, {max_wait}"
            )
        self.answer, self.max_batch, self.max_wait = answer, max_batch, max_wait
        self.batches = self.questions = 0  # forwards run and questions answered
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ban-batcher", daemon=True)
        self._thread.start()

    def submit(self, item) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def call(self, function, *args) -> Future:
        """Run `function(*args)` on the model thread, after what is queued: a future of its
        result."""
        return self.submit(_Call(function, args))

    def close(self) -> None:
        """Stop the thread once the queued questions are answered."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        recent, stop, call = collections.deque(maxlen=self.RECENT), False, None
        while not stop:
            first, call, idle_from = call, None, time.monotonic()
            if first is None:
                first = self._queue.get()
                if time.monotonic() - idle_from > self.max_wait:  # quiet: nobody about to ask
                    recent.clear()
            if first is None:
                return
            if isinstance(first[0], _Call):
                self._settle(first[1], first[0].function, *first[0].args)
                continue
            batch, expected = [first], min(max(recent, default=1), self.max_batch)
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    if len(batch) >= expected:  # as many as lately: take only what is queued
                        item = self._queue.get_nowait()
                    else:  # under load: wait for the clients just answered
                        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if isinstance(item[0], _Call):  # after this batch
                    call = item
                    break
                batch.append(item)
            recent.append(len(batch))
            batch = [(q, f) for q, f in batch if f.set_running_or_notify_cancel()]  # gone: skip
            if batch:
                try:
                    answers = self.answer([q for q, _ in batch])
                except Exception as error:
                    answers = [error] * len(batch)
                self.batches += 1
                self.questions += len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)

    @staticmethod
    def _settle(future: Future, function, *args) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function(*args))
            except BaseException as error:
                future.set_exception(error)


def _upload_refusal(data_dir: Path) -> str | None:
    """None when the data's features came from pictures (`ban.data.images`), else why not."""
    for path in sorted((Path(data_dir) / "features").glob("*.h5")):
        if extractor_info(path) is not None:
            return None
    return (
        "uploads need a model trained on picture features (`ban data from-images` or `ban "
        "features extract`): the features of this data were not made from pictures (e.g. the "
        "built-in benchmark's simulated detector), so a new picture cannot be featurised like them"
    )


def _clean(error: BaseException) -> str:
    """An exception's message without object reprs (`<_io.BytesIO object at 0x...>`)."""
    return _REPR.sub("the body", str(error))


def decode_picture(body: bytes):
    """An uploaded picture as RGB (upright by its EXIF orientation, the longer side at most
    `MAX_UPLOAD_SIDE`); ApiError 400 when it does not decode, 413 when it has too many pixels
    (`MAX_UPLOAD_PIXELS`, checked from its header before it is decoded; Pillow's own
    decompression-bomb limits are above it and give the same 413)."""
    too_many = (
        f"the picture has more than {MAX_UPLOAD_PIXELS} pixels (width x height); "
        f"at most {MAX_UPLOAD_PIXELS} in all"
    )
    if not body:
        raise ApiError(400, "the body is empty: send the picture's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise ApiError(
                    413,
                    f"the picture is {image.width}x{image.height} pixels, at most "
                    f"{MAX_UPLOAD_PIXELS} in all",
                )
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, too_many) from None
    except UnidentifiedImageError:
        raise ApiError(
            400, "not a picture that decodes (PNG, JPEG, ...): the format is not recognised"
        ) from None
    except (OSError, SyntaxError, ValueError, Warning) as error:
        raise ApiError(
            400, f"not a picture that decodes (PNG, JPEG, ...): {_clean(error)}"
        ) from None
    if max(image.size) > MAX_UPLOAD_SIDE:
        image.thumbnail((MAX_UPLOAD_SIDE, MAX_UPLOAD_SIDE), Image.Resampling.LANCZOS)
    return image


def _page(uploads: bool) -> bytes:
    html = resources.files("ban").joinpath("static/index.html").read_text(encoding="utf-8")
    html = html.replace("__MAX_QUESTION__", str(MAX_QUESTION))
    html = html.replace("__OR_UPLOAD__", " (or upload your own)" if uploads else "")
    return html.encode("utf-8")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[int, str]:
    """(status, message) of pydantic errors: 400 for JSON that does not parse, else 422."""
    messages, status = [], 422
    for error in errors:
        kind, loc = error["type"], [str(x) for x in error["loc"] if x not in ("body", "query")]
        field = ".".join(loc)
        if kind == "json_invalid":
            status = 400
            messages.append(f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        elif kind == "missing":
            messages.append(f"missing field: {field}")
        elif kind == "extra_forbidden":
            messages.append(f"unknown field: {field}")
        elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
            messages.append("the body must be a JSON object")
        elif error["msg"].startswith(field):  # our own messages name their field
            messages.append(error["msg"])
        else:
            messages.append(f"{field}: {error['msg']}" if field else error["msg"])
    return status, "; ".join(messages)


_ERRORS = {
    status: {"model": Error, "description": description}
    for status, description in [
        (400, "malformed JSON, or a picture that does not decode"),
        (404, "unknown image"),
        (408, "the body did not arrive in time"),
        (409, "uploads are off for this model"),
        (411, "no Content-Length"),
        (413, "the body (or picture) is over the limit"),
        (415, "wrong Content-Type"),
        (422, "a field is missing, unknown or out of range"),
    ]
}


def create_app(app: App) -> FastAPI:
    """The ASGI app (routes, JSON errors) over `app`; serve it with `make_server`."""
    api = FastAPI(
        title="ban serve",
        version="1",
        description="BAN VQA answers about the images of a dataset, and about uploaded pictures",
        docs_url=None,  # the interactive docs load scripts from a CDN: the page loads nothing
        redoc_url=None,
    )
    api.state.ban = app
    page = _page(app.upload_refusal is None)

    @api.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.message)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(error.errors()))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        path = request.url.path[:100]
        if error.status_code == 404:
            message = f"no such page: {path}"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {path} (allowed: {allowed})"
        else:
            message = str(error.detail)
        return _error(error.status_code, message, error.headers)

    @api.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        logging.getLogger("ban.serve").error("internal error: %r", error, exc_info=error)
        return _error(500, "internal error")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    @api.get("/index.html", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @api.get("/api/images", response_model=ImageList, responses={422: _ERRORS[422]})
    async def images(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = 100,
    ) -> ImageList:
        """The image ids of the dataset, a page at a time, and whether uploads are on."""
        return ImageList(**app.list_images(offset, limit))

    @api.get(
        "/api/images/{image_id}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: _ERRORS[404]},
    )
    async def picture(image_id: str) -> Response:
        """The picture of an image of the dataset, or of an upload (id < 0)."""
        if not _ID.fullmatch(image_id):
            raise ApiError(404, "unknown image: expected /api/images/<integer id>.png")
        checked = app.check_image(int(image_id))
        png = await run_in_threadpool(app.picture_png, checked)
        cache = "no-store" if app.is_upload(checked) else "max-age=3600"  # upload ids recur
        return Response(png, media_type="image/png", headers={"Cache-Control": cache})

    @api.post(
        "/api/answer",
        response_model=Answer,
        responses={s: _ERRORS[s] for s in (400, 404, 408, 411, 413, 415, 422)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": Question.model_json_schema()}},
            }
        },
    )
    async def answer(request: Request) -> Answer:
        """Answer a question about an image; the most attended boxes of each glimpse."""
        _require_json(request)
        try:
            question = Question.model_validate_json(await request.body())
        except ValidationError as error:
            raise ApiError(*_validation_message(error.errors(include_input=False))) from None
        return Answer(**await asyncio.wrap_future(app.submit(question)))

    @api.post(
        "/api/pictures",
        response_model=Picture,
        responses={s: _ERRORS[s] for s in (400, 408, 409, 411, 413, 415)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        description=(
            "The body is the picture's raw bytes (PNG, JPEG, or any format Pillow decodes) with "
            f"an image Content-Type (image/png, image/jpeg, ...), at most {MAX_UPLOAD} bytes "
            f"(413 above, not read) and {MAX_UPLOAD_PIXELS} pixels (413). It is turned upright "
            f"by its EXIF orientation, scaled down to at most {MAX_UPLOAD_SIDE} pixels on its "
            "longer side, featurised with the backbone that made the data's features, and kept "
            f"in memory (the last {MAX_UPLOADS} uploads; ids are negative). Ask about it with "
            "POST /api/answer and its image_id; boxes are in the pixels of the picture served at "
            "its url. 409 when the data's features were not made from pictures (see `uploads` "
            "in GET /api/images): uploads need a model trained on picture features."
        ),
    )
    async def pictures(request: Request) -> Picture:
        """Upload a new picture to ask about."""
        if app.upload_refusal is not None:
            raise ApiError(409, app.upload_refusal)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.startswith("image/"):
            raise ApiError(
                415,
                "send the picture's bytes as the body with an image Content-Type (image/png, "
                f"image/jpeg, ...), not {kind or 'none'!r}",
            )
        return Picture(**await run_in_threadpool(app.add_picture, await request.body()))

    return api


def _require_json(request: Request) -> None:
    # A JSON Content-Type also makes a browser ask (CORS preflight) before another site's page
    # can post to this server; the server does not answer preflights, so such posts fail.
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            415, f"send the question as JSON with Content-Type: application/json, not {kind!r}"
        )


class RequestLimits:
    """ASGI middleware: reads each request's body before the app sees it, at most `limit(path)`
    bytes (413, from Content-Length before reading when it is given) within `read_timeout`
    seconds (408); a POST needs a Content-Length or chunked body (411). Adds the headers every
    response carries. An early answer closes the connection (the body is left unread)."""

    def __init__(self, app, limits: dict[str, int], default: int, read_timeout: float) -> None:
        self.app, self.limits, self.default, self.read_timeout = app, limits, default, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(b"x-content-type-options", b"nosniff")]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = dict(scope["headers"])
        limit = self.limits.get(scope["path"], self.default)
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        refusal = None
        if scope["method"] == "POST" and length is None and not chunked:
            refusal = 411, "Content-Length is required"
        elif length is not None and int(length) > limit:  # h11 has checked it is a number
            refusal = 413, f"the body is {int(length)} bytes, at most {limit}"
        if refusal is not None:
            await _send_error(send_with_headers, *refusal)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                await _send_error(
                    send_with_headers,
                    408,
                    f"the body did not arrive within {self.read_timeout:g} s ({size} bytes came)",
                )
                return
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _send_error(send_with_headers, 413, f"the body is over {limit} bytes")
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_with_headers)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _raw_error(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ReadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on a request's line and headers: `read_timeout`
    seconds from a connection's start or a request's first byte (uvicorn's keep-alive timeout
    only runs between requests, and not at all before the first); then 408 and the connection
    is closed. Malformed requests get a JSON 400 (uvicorn's is text)."""

    read_timeout = READ_TIMEOUT

    def connection_made(self, transport) -> None:
        # No Nagle delay: uvicorn writes a response's headers and body apart, and without this
        # the body waited for the client's delayed ACK, 40 ms a request. (asyncio sets it only
        # on sockets made with proto IPPROTO_TCP, and socket.create_server's have proto 0.)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._read_timer = None
        self._began = False  # bytes of the pending request came
        self._arm()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()
            self._began = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in; the body has its own
            self._disarm()
            self._began = False

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._began:
            message = f"the request's headers did not arrive within {self.read_timeout:g} s"
            self.transport.write(_raw_error(408, "Request Timeout", message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers)))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket (port 0: any free port). OSError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=512)


class Server:
    """uvicorn serving `app` on a bound socket, with `http.server`'s interface: `serve_forever`
    (blocks; from any thread), `shutdown` (from another thread; waits), `server_close`."""

    def __init__(
        self, app: App, sock: socket.socket, quiet: bool = False, read_timeout: float = READ_TIMEOUT
    ) -> None:
        self.app = app
        self.socket = sock
        self.server_address = sock.getsockname()
        asgi = RequestLimits(create_app(app), {"/api/pictures": MAX_UPLOAD}, MAX_BODY, read_timeout)
        protocol = type("Protocol", (ReadTimeoutProtocol,), {"read_timeout": read_timeout})
        config = uvicorn.Config(
            asgi,
            http=protocol,
            lifespan="off",
            access_log=not quiet,
            log_level="warning" if quiet else "info",
            log_config=None if quiet else uvicorn.config.LOGGING_CONFIG,
            h11_max_incomplete_event_size=MAX_HEADER,
            server_header=False,
        )
        self.uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    app: App,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
    read_timeout: float = READ_TIMEOUT,
    sock: socket.socket | None = None,
) -> Server:
    """A server for `app` on `host:port` (port 0: any free port; see `server.server_address`),
    or on `sock` from `bind`."""
    return Server(app, sock or bind(host, port), quiet, read_timeout)


def load_app(
    checkpoint: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    device: str = "cpu",
    max_batch: int = MAX_BATCH,
    max_wait: float = MAX_WAIT,
    precision: str = "auto",
    image_cache_bytes: int = IMAGE_CACHE_BYTES,
) -> App:
    """Load the model once, on the model thread: a checkpoint file or run directory, on the
    run's data by default; `precision`, `image_cache_bytes`: see `Predictor`; `max_batch`,
    `max_wait`: see `Batcher`."""
    batcher = Batcher(max_batch=max_batch, max_wait=max_wait)
    try:
        predictor = batcher.call(
            lambda: Predictor.from_checkpoint(
                checkpoint, data, device, precision=precision, image_cache_bytes=image_cache_bytes
            )
        ).result()
        return App(predictor, ImageFolder.for_data(predictor.data_dir, images), batcher=batcher)
    except BaseException:
        batcher.close()
        raise
