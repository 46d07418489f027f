"""Triton python-backend model: runs `model.onnx` of its version folder with onnxruntime.

Copied as `<model>/<version>/model.py` by `export.repository`. It runs inside Triton's
python backend stub (the `.venv-triton` environment: numpy<2, onnxruntime), so it may
import nothing from this project.

Dynamic batching hands `execute` several requests at once: their images are joined
into one onnxruntime run and the embeddings split back, one response per request.
The same file serves a text tower (`<encoder>_text`): its one input is `tokens`, not
`images`, and is read by the name the config gives.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _providers(fp16, device_id, engine_cache):
    """Fastest execution providers present, best first; CPU always closes the list."""
    available = ort.get_available_providers()
    chosen = []
    if "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": device_id,
            "trt_fp16_enable": fp16,
            # Version folders are never rewritten, so a cached engine cannot go stale;
            # building one takes minutes, so it is kept next to the model it was built from.
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": engine_cache,
        }))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    chosen.append(("CPUExecutionProvider", {}))
    return chosen


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]  # "images", or "tokens" for a text tower
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        providers = _providers(
            fp16=params.get("fp16") == "true",
            device_id=int(args.get("model_instance_device_id", 0)),
            engine_cache=os.path.join(version_dir, "trt_cache"),
        )
        # onnxruntime falls back to the next provider itself when one fails to start
        # (e.g. TensorRT libraries missing), so the log line says what actually runs.
        options = ort.SessionOptions()
        # onnxruntime's worker threads otherwise spin for a while after every run, taking
        # the cores from the search API beside Triton: on 2 cores that made the FAISS
        # search after each embedding 4-6x slower (`histoseek bench search`, 2026-11-23).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            os.path.join(version_dir, "model.onnx"), sess_options=options, providers=providers
        )
        pb_utils.Logger.log_info(
            f"{args['model_name']} v{args['model_version']}: onnxruntime {ort.__version__} "
            f"providers {self.session.get_providers()}"
        )

    def _embed(self, images):
        out = self.session.run(["embeddings"], {self.input_name: images})[0]
        return out.astype(np.float32, copy=False)

    def _response(self, embeddings):
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("embeddings", embeddings)]
        )

    def _error(self, exc):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"embedding failed: {exc}")
        )

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            joined = self._embed(np.concatenate(batches))
        except Exception:
            # One bad request must not fail the others it was batched with: run each alone
            # so only the culprit gets an error response.
            return [self._run_alone(images) for images in batches]
        ends = np.cumsum([len(b) for b in batches])[:-1]
        return [self._response(part) for part in np.split(joined, ends)]

    def _run_alone(self, images):
        try:
            return self._response(self._embed(images))
        except Exception as exc:
            return self._error(exc)
