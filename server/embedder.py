"""Embeddings from a Triton-served encoder, over HTTP or gRPC (tritonclient).

The model follows the export contract: `images` uint8 [N, S, S, 3] RGB in, `embeddings`
float32 [N, D] L2-normalised out. The encoder spec (S, D, mean/std, ...) is read from
the model config's parameters, so a client needs only the URL and the model name.

Failures become HistoseekError subclasses whose messages say what to do:
`TritonUnavailable` (server down, model not ready, timeout; the API answers 503),
`ModelNotFound` and `InvalidImages`.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from histoseek.errors import HistoseekError

START_HINT = "start it with `histoseek triton start --repo model_repository`"

# gRPC reconnects to a lost server with exponential backoff, by default up to 120 s
# apart, so after Triton was down for minutes the API would stay unready that long
# after it is back. Retrying every second at most costs nothing on a LAN. The message
# sizes are tritonclient's defaults, which passing any channel_args replaces (its
# keepalive defaults are gRPC's own, so they need no repeating). min_reconnect_backoff
# stays 20 s: it is also how long one connection attempt may take.
_GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonUnavailable(HistoseekError):
    """Triton cannot answer now: not running, unreachable, model not ready, or too slow."""


class ModelNotFound(HistoseekError):
    """Triton runs but does not have the model asked for."""


class InvalidImages(HistoseekError):
    """The images do not match what the model takes (uint8 [N, S, S, 3])."""


class Embedder:
    def __init__(
        self,
        url: str,
        model: str,
        protocol: str = "grpc",
        timeout: float = 30,
        batch_size: int = 32,
    ):
        if protocol not in ("grpc", "http"):
            raise HistoseekError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
        # tritonclient wants host:port; accept a pasted http://host:port as well.
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.model, self.protocol = model, protocol
        self.timeout, self.batch_size = timeout, batch_size
        self._module = grpcclient if protocol == "grpc" else httpclient
        # The HTTP client (geventhttpclient) must not be shared between threads, and the
        # API calls embed() from a thread pool: one client per thread.
        self._local = threading.local()
        self._spec: dict[str, Any] | None = None
        self._max_batch_size = 0

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = grpcclient.InferenceServerClient(self.url, channel_args=_GRPC_CHANNEL_ARGS)
            else:
                client = httpclient.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            self._local.client = client
        return client

    def _call(self, method: str, *args, **kwargs):
        """Call a client method, turning transport and server errors into ours."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except InferenceServerException as exc:
            raise self._translate(exc) from None
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:  # the HTTP client raises socket errors as they are
            raise self._unreachable(exc.strerror or str(exc)) from None

    def _unreachable(self, detail: str) -> TritonUnavailable:
        return TritonUnavailable(
            f"Triton is not reachable over {self.protocol} at {self.url} ({detail}); "
            f"is it running? {START_HINT}"
        )

    def _timed_out(self) -> TritonUnavailable:
        return TritonUnavailable(
            f"Triton at {self.url} did not answer within {self.timeout:g}s; it may be "
            "overloaded or still loading: retry, or raise the timeout"
        )

    def _translate(self, exc: InferenceServerException) -> HistoseekError:
        status, message = str(exc.status()), exc.message() or str(exc)
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return self._timed_out()
        if status == "StatusCode.UNAVAILABLE":
            return self._unreachable(message)
        if status in ("StatusCode.NOT_FOUND", "404"):
            return self._missing_model()
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            return InvalidImages(f"Triton rejected the request for model {self.model!r}: {message}")
        return HistoseekError(f"Triton at {self.url} failed on model {self.model!r}: {message}")

    def _missing_model(self) -> HistoseekError:
        # Triton says "not found" both for an unknown model and for one that failed to
        # load; its repository index tells them apart.
        index = self._call("get_model_repository_index", **self._as_json())
        models = index["models"] if isinstance(index, dict) else index
        for entry in models or []:
            if entry.get("name") == self.model:
                reason = entry.get("reason") or "see the Triton log (`histoseek triton status`)"
                return TritonUnavailable(
                    f"model {self.model!r} on Triton at {self.url} is not ready "
                    f"(state {entry.get('state', 'UNKNOWN')}: {reason})"
                )
        served = sorted({entry["name"] for entry in models or []}) or ["none"]
        return ModelNotFound(
            f"Triton at {self.url} has no model {self.model!r}; it serves: {', '.join(served)}. "
            "Pick one of those, or export the encoder with `histoseek export` and restart Triton"
        )

    def _as_json(self) -> dict[str, bool]:
        # The gRPC client returns protobuf messages unless asked for JSON; HTTP always JSON.
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _parameters(self) -> tuple[dict[str, str], int]:
        config = self._call("get_model_config", self.model, **self._as_json())
        config = config.get("config", config)  # gRPC wraps it
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return params, int(config.get("max_batch_size", 0))

    def ready(self) -> bool:
        """Whether the server answers and the model is loaded."""
        try:
            return bool(self._call("is_model_ready", self.model))
        except HistoseekError:
            return False

    def spec(self) -> dict[str, Any]:
        """The encoder spec (input_size, embedding_dim, mean, std, ...) of the served model."""
        if self._spec is None:
            params, self._max_batch_size = self._parameters()
            if "encoder_spec" not in params:
                raise HistoseekError(
                    f"model {self.model!r} on Triton at {self.url} has no encoder_spec parameter: "
                    "it was not exported by histoseek; export it with `histoseek export`"
                )
            self._spec = json.loads(params["encoder_spec"])
        return self._spec

    def version_checksum(self) -> str | None:
        """sha256 of the model.onnx served now (config parameter `model_sha256`); not cached,
        so a long-running client notices a newly loaded version."""
        return self._parameters()[0].get("model_sha256")

    def version_number(self) -> int | None:
        """The model-repository version served now (config parameter `model_version`)."""
        version = self._parameters()[0].get("model_version")
        return int(version) if version else None

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed uint8 RGB images [N, S, S, 3]; float32 [N, D], in batches of batch_size."""
        spec = self.spec()
        size, dim = int(spec["input_size"]), int(spec["embedding_dim"])
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise InvalidImages(
                f"model {self.model!r} takes uint8 RGB images shaped [N, {size}, {size}, 3]; "
                f"got {images.dtype} {list(images.shape)}. Resize and crop them to {size}x{size}"
            )
        step = min(self.batch_size, self._max_batch_size or self.batch_size)
        parts = [self._infer(images[i:i + step]) for i in range(0, len(images), step)]
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        inputs = self._module.InferInput("images", list(batch.shape), "UINT8")
        inputs.set_data_from_numpy(np.ascontiguousarray(batch))
        outputs = self._module.InferRequestedOutput("embeddings")
        result = self._call("infer", self.model, [inputs], outputs=[outputs])
        return result.as_numpy("embeddings")
