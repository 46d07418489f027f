"""The API's one error shape: JSON `{"error": "..."}` with a message a person can act on."""
from __future__ import annotations

from fastapi.responses import JSONResponse


def megabytes(size: int) -> str:
    return f"{size / 1e6:.3g} MB"


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
