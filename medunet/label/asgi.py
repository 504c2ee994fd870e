"""The ASGI app the label server runs: MONAI Label's FastAPI app behind medunet's request checks.

``medunet label-server`` starts ``monailabel.main start_server --uvicorn_app medunet.label.asgi:app``
(an option of MONAI Label's own launcher), so every endpoint is MONAI Label's, and requests whose ids
are paths (``image=../../etc/passwd``) get a 400 before any file is opened. Needs monailabel.
"""

from __future__ import annotations

from monailabel.app import app as _monailabel_app
from starlette.responses import JSONResponse

from medunet.label.safety import check_request

__all__ = ["app", "RejectPathIds"]


class RejectPathIds:
    """ASGI middleware: 400 ``{"detail": reason}`` for path-like ids or ``..`` path segments."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            reason = check_request(scope.get("path", ""), scope.get("query_string", b""))
            if reason:
                await JSONResponse({"detail": f"refused: {reason}"}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_monailabel_app.add_middleware(RejectPathIds)
app = _monailabel_app
