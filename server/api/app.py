"""The search API (FastAPI): every index folder under `indexes_dir`, embedded through Triton.

The two endpoints that decode an upload reserve its decode memory first and run in the
admission's own thread pool, with a deadline (server/api/admission.py); the cheap endpoints
are plain `def` functions in FastAPI's thread pool; /healthz and /readyz answer from the
event loop, whatever the pools are doing. Index and item names from URLs are only ever
looked up among the indexes loaded at start, never joined to a path. Every error is JSON
`{"error": "..."}` with a message a person can act on.

Access: with API keys configured, every request that changes an index needs one (and,
with `protect_search`, every read of the indexes too); `server.api.guard` checks keys and body
size before the app reads a byte of the body. Keys are never logged.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from histoseek.errors import HistoseekError
from histoseek.imaging import read_header
from server.api.admission import Admission, Busy, OverBudget
from server.job import Job, Stopped
from server.api.metrics import install_metrics
from server.index.backends import BackendUnavailable
from server.embedder import Embedder, ModelNotFound, TritonUnavailable
from server.index.fields import InvalidField, NoSuchId, item_id, text_field, upload_name
from server.index.filters import ItemFilter, from_lists
from server.api.framing import AS_CURL, RequestFraming
from server.api.guard import RequestGuard
from server.api.head import HeadAsGet
from server.api.http_errors import json_error, megabytes
from server.image_cost import decode_bytes
from server.index.folder import MANIFEST_FILE, IndexFolder, ModelMismatch, UnknownItems
from server.refine import BadMarks, check_marks
from server.search import BadImage, ImageTooLarge, SearchCore
from server.text_search import InvalidText, NoTextTower, TextSearch
from server.api.settings import Settings
from server.api.slide_admission import Interactive, SlideQueue, SlidesBusy
from server.slides.search import NoSuchSlide, NoTissue, SlideSearch, outcome_json
from server.slides.views import SlideUnavailable
from server.index.store import Item

log = logging.getLogger(__name__)


class Result(BaseModel):
    rank: int
    id: int
    score: float  # inner product of L2-normalised embeddings: cosine similarity
    label: str
    group: str
    source: str
    image_url: str  # the item's stored thumbnail
    # Tiles of whole slides: which slide, and where (level-0 px of its top-left corner).
    slide: str | None = None
    x: int | None = None
    y: int | None = None


class Vote(BaseModel):
    label: str  # majority label of the results (ties: the best-ranked)
    share: float


class SearchResponse(BaseModel):
    index: str
    k: int
    filter: dict[str, list[str]] | None = None  # the filter applied, as given (absent: none)
    results: list[Result]
    vote: Vote
    timings_ms: dict[str, float]  # decode, preprocess, embed, search, total


class IndexSummary(BaseModel):
    name: str
    encoder: str
    type: str
    count: int
    dimension: int
    labels: list[str]
    model_sha256: str | None


class AddedItem(BaseModel):
    index: str
    id: int
    label: str
    group: str
    image_url: str


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _status_of(exc: HistoseekError) -> int:
    if isinstance(exc, BadImage):
        return 400
    if isinstance(exc, (ImageTooLarge, OverBudget)):
        return 413
    if isinstance(exc, (NoSuchId, NoSuchSlide)):
        return 404
    if isinstance(exc, (InvalidField, NoTissue, BadMarks, UnknownItems)):
        return 422
    if isinstance(exc, (TritonUnavailable, ModelNotFound, ModelMismatch, Busy, Stopped, SlideUnavailable,
                        BackendUnavailable, SlidesBusy)):
        return 503
    from histoseek.slides.reader import SlideError

    if isinstance(exc, SlideError):  # an uploaded slide OpenSlide cannot read
        return 400
    return 500


class Service:
    """The loaded indexes, one Embedder per encoder, and the settings."""

    def __init__(self, indexes_dir: Path, triton_url: str, protocol: str, settings: Settings):
        if not indexes_dir.is_dir():
            raise HistoseekError(f"the indexes folder {indexes_dir} does not exist; build an index into it "
                                 f"with `histoseek index build --out {indexes_dir}/<name>`")
        self.indexes_dir, self.settings = indexes_dir, settings
        self.cores: dict[str, SearchCore] = {}
        self.load_errors: dict[str, str] = {}
        embedders: dict[str, Embedder] = {}
        for path in sorted(p for p in indexes_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (path / MANIFEST_FILE).is_file():
                continue
            try:
                folder = IndexFolder(path)
            except HistoseekError as exc:
                log.error("cannot load index %s: %s", path, exc)
                self.load_errors[path.name] = str(exc)
                continue
            encoder = folder.manifest["encoder"]
            if encoder not in embedders:
                embedders[encoder] = Embedder(triton_url, encoder, protocol, timeout=settings.triton_timeout_s)
            self.cores[path.name] = SearchCore(folder, embedders[encoder], max_pixels=settings.max_pixels,
                                               max_aspect=settings.max_aspect_ratio,
                                               check_interval_s=settings.model_check_interval_s)
        self.admission = Admission(settings.max_decode_bytes, settings.request_timeout_s, settings.decode_wait_s,
                                   settings.workers)
        from server.api.memory import trim_freed_memory
        from server.slides.search import MAX_QUERY_TILES

        self.slide_queue = SlideQueue(settings.slide_start_rate, settings.max_queued_slides, settings.slide_workers,
                                      MAX_QUERY_TILES, after_each=trim_freed_memory)
        self.interactive = Interactive()  # patch searches in flight: slide work gives way to them
        # /readyz asks Triton: in a thread of its own, so that busy pools never make it late.
        self.readiness_pool = ThreadPoolExecutor(1, thread_name_prefix="histoseek-readyz")

    def core(self, name: str | None) -> SearchCore:
        known = ", ".join(sorted(self.cores)) or "none"
        if name is None or name == "":
            if len(self.cores) == 1:
                return next(iter(self.cores.values()))
            raise ApiError(400, f"name the index to search (field `index`); loaded indexes: {known}")
        if name not in self.cores:
            raise ApiError(404, f"no index named {name!r}; loaded indexes: {known}")
        return self.cores[name]

    async def decode_and(self, request: Request, core: SearchCore, upload: UploadFile, work):
        """`work(data, name, job)` in the admission's pool, once the upload's decode memory
        (judged from its header, which only the allow-listed decoders read) is reserved."""
        name, limit = upload_name(upload.filename), self.settings.max_upload_bytes
        size = upload.size if upload.size is not None else limit + 1
        if size > limit:
            raise ApiError(413, f"{name} is larger than {megabytes(limit)}; "
                                "send a smaller patch or tile the image first (histoseek data prepare)")
        if size == 0:
            raise BadImage(f"{name} is empty: send a PNG, JPEG or TIFF file")

        def header():
            upload.file.seek(0)
            try:
                return read_header(upload.file, max_pixels=core.max_pixels, max_aspect=core.max_aspect, name=name)
            except ImageTooLarge:
                raise
            except HistoseekError as exc:
                raise BadImage(str(exc)) from None

        cost = decode_bytes(await run_in_threadpool(header), core.folder.manifest.get("input_size", 224)) + size

        def run(job: Job):
            with self.interactive:
                upload.file.seek(0)
                return work(upload.file.read(limit + 1), name, job)

        return await self.admission.run(cost, run, request.is_disconnected)

    def results_wanted(self, k: int | None, default: int | None = None) -> int:
        """A request's k (its default when not given), refused with 422 outside 1..--max-k."""
        k = (self.settings.default_k if default is None else default) if k is None else k
        if not 1 <= k <= self.settings.max_k:
            raise ApiError(422, f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    def readiness(self) -> dict[str, str]:
        """Problems by part ('index <name>' or 'indexes'); empty when everything is ready."""
        problems = {f"index {name}": error for name, error in self.load_errors.items()}
        if not self.cores and not self.load_errors:
            problems["indexes"] = (f"no index folders in {self.indexes_dir}; build one with "
                                   f"`histoseek index build --out {self.indexes_dir}/<name>`")
        for name, core in self.cores.items():
            try:
                core.folder.check_available()
                core.verify_model(force=True)
                if not core.embedder.ready():
                    raise TritonUnavailable(f"model {core.embedder.model!r} is not ready on Triton at "
                                            f"{core.embedder.url}")
            except HistoseekError as exc:
                problems[f"index {name}"] = str(exc)
        return problems


def _search_response(app: FastAPI, name: str, k: int, where: ItemFilter | None, outcome) -> SearchResponse:
    for stage, ms in outcome.timings_ms.items():
        app.state.stage_seconds.labels(stage).observe(ms / 1000)
    return SearchResponse(
        index=name, k=k, filter=where.describe() if where is not None else None,
        results=[Result(rank=rank, id=hit.id, score=hit.score, **_item_fields(hit.item),
                        image_url=_image_url(name, hit.id)) for rank, hit in enumerate(outcome.hits, 1)],
        vote=Vote(label=outcome.vote[0], share=outcome.vote[1]),
        timings_ms={stage: round(ms, 3) for stage, ms in outcome.timings_ms.items()},
    )


def _service(request: Request) -> Service:
    return request.app.state.service


def _multipart(request: Request) -> None:
    """Uploads come as multipart/form-data; anything else would only get a puzzling 'field required'.
    (A malformed multipart request never gets here: server.api.framing answers it.)"""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"send the image as multipart/form-data (got {content_type or 'no content type'!r}), "
                            f"{AS_CURL}")


def _search_filter(labels: list[str] | None = Form(None), exclude_labels: list[str] | None = Form(None),
                   groups: list[str] | None = Form(None), exclude_groups: list[str] | None = Form(None),
                   sources: list[str] | None = Form(None), exclude_sources: list[str] | None = Form(None),
                   query_group: str | None = Form(None)) -> ItemFilter | None:
    """The search's metadata filter from repeatable form fields (`labels=tumour&labels=stroma`);
    `query_group`, the query's own slide or patient, is excluded from the results."""
    where = from_lists(labels=labels, exclude_labels=exclude_labels, groups=groups, exclude_groups=exclude_groups,
                       sources=sources, exclude_sources=exclude_sources)
    if query_group is not None:
        where = (where or ItemFilter()).without_group(text_field("group", query_group, "query_group"))
    return where


def _image_url(index: str, item_id: int) -> str:
    return f"/v1/items/{quote(index, safe='')}/{item_id}/image"


def _item_fields(item: Item) -> dict:
    where = {"slide": item.group, "x": item.x, "y": item.y} if item.mpp > 0 else {}
    return {"label": item.label, "group": item.group, "source": item.shown_source, **where}


def create_app(indexes_dir: Path, triton_url: str, protocol: str = "grpc", settings: Settings | None = None) -> FastAPI:
    service = Service(Path(indexes_dir), triton_url, protocol, settings or Settings())
    @asynccontextmanager
    async def closing_indexes(app: FastAPI):
        yield
        # Milvus connections (and the Milvus Lite servers of local databases) end with the app.
        for core in service.cores.values():
            core.folder.close()

    app = FastAPI(title="HistoSeek search API", version="1", lifespan=closing_indexes,
                  description="Content-based retrieval of histopathology image patches.")
    app.state.service = service
    # Added innermost first: CORS outermost (its headers reach every answer, and a preflight
    # needs no key), then the metrics (they count refusals too), then HEAD routed as GET,
    # the guard (keys, size) and the framing checks.
    app.add_middleware(RequestFraming)
    app.add_middleware(RequestGuard, settings=service.settings)
    app.add_middleware(HeadAsGet)
    install_metrics(app)
    if service.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(service.settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "X-API-Key"])
    _install_error_handlers(app)
    upload = [Depends(_multipart)]

    # Results of plain images leave out the slide fields (null) and keep their old shape.
    @app.post("/v1/search", summary="Search an index with an image (PNG, JPEG or TIFF)", dependencies=upload,
              response_model_exclude_none=True)
    async def search(request: Request, image: UploadFile = File(...), index: str | None = Form(None),
                     k: int | None = Form(None), where: ItemFilter | None = Depends(_search_filter),
                     svc: Service = Depends(_service)) -> SearchResponse:
        k = svc.results_wanted(k)
        core = svc.core(index)
        outcome = await svc.decode_and(request, core, image, lambda data, name, job: core.search(
            data, k, name=name, check=job.check, where=where))
        return _search_response(app, core.folder.name, k, where, outcome)

    @app.post("/v1/search/refine", summary="Search again with results marked relevant or not (Rocchio)",
              dependencies=upload, response_model_exclude_none=True)
    async def refine(request: Request, image: UploadFile = File(...), index: str | None = Form(None),
                     k: int | None = Form(None), relevant: list[int] | None = Form(None),
                     not_relevant: list[int] | None = Form(None), where: ItemFilter | None = Depends(_search_filter),
                     svc: Service = Depends(_service)) -> SearchResponse:
        """The query image again, with the ids of results the user marked (repeatable fields
        `relevant=12&relevant=40&not_relevant=7`); stateless: nothing is kept between rounds."""
        k = svc.results_wanted(k)
        relevant, not_relevant = relevant or [], not_relevant or []
        core = svc.core(index)
        check_marks(relevant, not_relevant)
        outcome = await svc.decode_and(request, core, image, lambda data, name, job: core.refine(
            data, k, relevant, not_relevant, name=name, check=job.check, where=where))
        return _search_response(app, core.folder.name, k, where, outcome)

    texts = TextSearch(service.settings.tokenizer_dirs, service.settings.model_check_interval_s)

    # Form fields (urlencoded or multipart) as the other searches, so the same filter fields apply.
    @app.post("/v1/search/text", summary="Search an index with a text (encoders with a text tower)",
              response_model_exclude_none=True)
    def search_text(text: str | None = Form(None), index: str | None = Form(None), k: int | None = Form(None),
                    where: ItemFilter | None = Depends(_search_filter), svc: Service = Depends(_service)) -> SearchResponse:
        k = svc.results_wanted(k)
        core = svc.core(index)
        try:
            outcome = texts.search(core, text, k, where)
        except (NoTextTower, InvalidText) as exc:
            raise ApiError(400 if isinstance(exc, NoTextTower) else 422, str(exc)) from None
        return _search_response(app, core.folder.name, k, where, outcome)

    @app.get("/v1/indexes/{index}/prompts", summary="The prompts an index's text tower was trained on, per class")
    def text_prompts(index: str, svc: Service = Depends(_service)) -> dict:
        core = svc.core(index)
        try:
            prompts = texts.prompts(core)
        except NoTextTower as exc:
            raise ApiError(400, str(exc)) from None
        return {"index": core.folder.name, "encoder": core.folder.manifest["encoder"], "prompts": prompts}

    @app.get("/v1/indexes", summary="The loaded indexes")
    def indexes(svc: Service = Depends(_service)) -> list[IndexSummary]:
        return [IndexSummary(name=name, encoder=core.folder.manifest["encoder"],
                             type=core.folder.manifest["index_type"], count=core.folder.store.count(),
                             dimension=core.folder.manifest["dimension"], labels=core.folder.store.labels(),
                             model_sha256=core.folder.manifest["model_sha256"])
                for name, core in svc.cores.items()]

    @app.get("/v1/items/{index}/{item_id}/image", summary="An indexed item's stored thumbnail (JPEG)",
             response_class=Response)
    def item_image(index: str, item_id: str, svc: Service = Depends(_service)) -> Response:
        folder = svc.core(index).folder
        thumbnail = folder.store.thumbnail(_item_id(index, item_id))
        if thumbnail is None:
            raise ApiError(404, f"index {index!r} has no item {item_id}")
        return Response(thumbnail, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/indexes/{index}/items", status_code=201, summary="Embed an image and add it to an index",
              dependencies=upload)
    async def add_item(request: Request, index: str, image: UploadFile = File(...), label: str = Form(...),
                       group: str | None = Form(None), svc: Service = Depends(_service)) -> AddedItem:
        core = svc.core(index)
        label = text_field("label", label, "the form field `label`")
        if group:  # empty: not given
            group = text_field("group", group, "the form field `group`")
        embedding, thumbnail, name = await svc.decode_and(
            request, core, image, lambda data, name, job: (*core.prepare_item(data, name, check=job.check), name))
        # Without a group the item is its own group, as every image of a folder-per-class dataset.
        item = Item(-1, f"upload:{name}", label, group or f"upload:{time.time_ns()}", source=name)
        (new_id,) = await run_in_threadpool(core.folder.add, embedding[None], [item], [thumbnail])
        return AddedItem(index=index, id=new_id, label=label, group=item.group, image_url=_image_url(index, new_id))

    @app.delete("/v1/indexes/{index}/items/{item_id}", summary="Remove an item from an index")
    def delete_item(index: str, item_id: str, svc: Service = Depends(_service)) -> dict:
        folder = svc.core(index).folder
        if not folder.remove([_item_id(index, item_id)]):
            raise ApiError(404, f"index {index!r} has no item {item_id}")
        return {"index": index, "id": int(item_id), "deleted": True}

    _slide_routes(app, service)

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict:
        return {"status": "ok"}  # on the event loop: no pool, however busy, delays it

    @app.get("/readyz", summary="Triton reachable, models ready and matching, indexes loaded")
    async def readyz() -> JSONResponse:
        loop = asyncio.get_running_loop()
        try:
            problems = await asyncio.wait_for(loop.run_in_executor(service.readiness_pool, service.readiness),
                                              service.settings.triton_timeout_s)
        except asyncio.TimeoutError:
            problems = {"triton": f"the readiness check took longer than {service.settings.triton_timeout_s:g} s"}
        if problems:
            return JSONResponse({"ready": False, "error": "; ".join(f"{part}: {why}" for part, why in problems.items()),
                                 "not_ready": problems}, status_code=503)
        return JSONResponse({"ready": True, "indexes": sorted(service.cores)})

    return app


def _slide_routes(app: FastAPI, service: Service) -> None:
    """Slide search, the slides of an index, and pictures of them (server/slides/views.py)."""
    from server.slides import views

    # Form fields as multipart (with an uploaded slide) or urlencoded (a slide id alone).
    @app.post("/v1/search/slides", summary="Rank an index's slides against a query slide (Yottixel mosaic)")
    async def search_slides(request: Request, slide_id: str | None = Form(None), slide: UploadFile | None = File(None),
                            index: str | None = Form(None), k: int | None = Form(None),
                            svc: Service = Depends(_service)) -> dict:
        k = svc.results_wanted(k, default=5)
        if (slide_id is None) == (slide is None):
            raise ApiError(422, "give either the form field `slide_id` (a slide of the index) or a slide file "
                                "in the field `slide`")
        core = svc.core(index)
        if slide_id is not None:
            slide_id = text_field("slide_id", slide_id, "the form field `slide_id`")
        from server.api.slide_requests import search_slide

        outcome = await search_slide(searcher=SlideSearch(core), slide_id=slide_id, upload=slide, k=k,
                                     settings=svc.settings, admission=svc.admission, queue=svc.slide_queue,
                                     interactive=svc.interactive, gone=request.is_disconnected)
        return outcome_json(outcome, core.folder.name)

    @app.get("/v1/slides/{index}", summary="The slides an index holds tiles of")
    def slide_list(index: str, svc: Service = Depends(_service)) -> list[dict]:
        # tile_size: level-0 px one indexed tile covers (the box to draw around a match).
        return [{"slide": r.slide, "label": r.label, "width": r.width, "height": r.height, "mpp": r.slide_mpp,
                 "tile_size": max(1, round(r.tile * r.mpp / r.slide_mpp)),
                 "thumbnail_url": f"/v1/slides/{quote(index, safe='')}/{quote(r.slide, safe='')}/thumbnail"}
                for r in svc.core(index).folder.store.slides()]

    def record(svc: Service, index: str, slide: str):
        found = svc.core(index).folder.store.slide(slide)
        if found is None:
            raise ApiError(404, f"index {index!r} holds no slide {slide[:120]!r}")
        return found

    @app.get("/v1/slides/{index}/{slide}/thumbnail", response_class=Response,
             summary="A slide's thumbnail (JPEG; headers give level-0 size and px per thumbnail px)")
    def slide_thumbnail(index: str, slide: str, size: int | None = Query(None), svc: Service = Depends(_service)):
        data, headers = views.thumbnail(record(svc, index, slide), size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600", **headers})

    @app.get("/v1/slides/{index}/{slide}/region", response_class=Response,
             summary="A square region of a slide (JPEG) at a pyramid level, top-left in level-0 px")
    def slide_region(index: str, slide: str, x: int = Query(...), y: int = Query(...), level: int = Query(0),
                     size: int | None = Query(None), svc: Service = Depends(_service)):
        data = views.region(record(svc, index, slide), x, y, level, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _item_id(index: str, text: str) -> int:
    try:
        return item_id(text)
    except NoSuchId:
        raise ApiError(404, f"index {index!r} has no item {text[:40]}") from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return json_error(exc.status, exc.message)

    @app.exception_handler(HistoseekError)
    async def histoseek_error(request: Request, exc: HistoseekError) -> JSONResponse:
        status = _status_of(exc)
        if status == 500:
            log.error("request %s failed: %s", request.url.path, exc)
        # Retry-After where waiting helps: others' decodes finish within seconds.
        retry = str(exc.retry_after) if isinstance(exc, SlidesBusy) else "2" if isinstance(exc, Busy) else None
        return json_error(status, str(exc), {"Retry-After": retry} if retry else None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("%s %s: the client went away before its request was read", request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return json_error(422, "invalid request: " + "; ".join(problems) + " (see /docs)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):  # routing's own
            message = f"{request.method} {request.url.path} is not an endpoint of this API; see /docs for the endpoints"
        elif exc.status_code == 400 and "multipart/form-data" not in message:
            # the multipart parser's: a body that is not the form it claims to be
            message = f"{message.rstrip('.')}; send the image as multipart/form-data, {AS_CURL}"
        return json_error(exc.status_code, message, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return json_error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def serve(indexes_dir: Path, triton_url: str, protocol: str = "grpc", host: str = "127.0.0.1", port: int = 8080,
          settings: Settings | None = None) -> None:
    """Run the API with uvicorn until interrupted (OpenAPI docs at /docs)."""
    import faiss
    import uvicorn

    from server.api.memory import return_freed_memory
    from server.api.protocol import uvicorn_config

    # Requests already run in parallel threads; OpenMP teams inside each search would
    # oversubscribe the cores (and spin), so every search keeps to its own thread.
    faiss.omp_set_num_threads(1)
    return_freed_memory()
    app = create_app(indexes_dir, triton_url, protocol, settings)
    # Everything loaded so far lives as long as the server: out of the collector's sight, a
    # full collection (set off by the objects a slide search makes) walks only what requests
    # made, and no longer pauses every thread for a few hundred ms (issue 22).
    gc.collect()
    gc.freeze()
    # A thread waiting for the interpreter lock gets it after at most this long: 1 ms instead
    # of 5, so that a patch search's many short steps are not each held up behind slide work
    # (tile reading, ranking) running in other threads.
    sys.setswitchinterval(0.001)
    settings = app.state.service.settings
    access = ("no API keys: anyone who reaches the port may add and remove items" if not settings.api_keys else
              f"{len(settings.api_keys)} API keys, needed for {'reads and writes' if settings.protect_search else 'writes'}")
    log.info("serving %d indexes from %s on http://%s:%d (docs at /docs); %s; decode budget %s, "
             "requests stopped after %g s", len(app.state.service.cores), indexes_dir, host, port, access,
             megabytes(settings.max_decode_bytes), settings.request_timeout_s)
    uvicorn.Server(uvicorn_config(app, host, port, settings)).run()
