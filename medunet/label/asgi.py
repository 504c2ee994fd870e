"""The ASGI app the label server runs: MONAI Label's FastAPI app behind medunet's request checks.

``medunet label-server`` starts ``monailabel.main start_server --uvicorn_app medunet.label.asgi:app``
(an option of MONAI Label's own launcher), so every endpoint is MONAI Label's, with two changes:

* requests whose ids are paths (``image=../../etc/passwd``) get a 400 before any file is opened;
* ``POST /infer/{model}`` runs MONAI Label's own handler (``monailabel.endpoints.infer.run_inference``)
  in a worker thread behind an :class:`~medunet.label.gate.InferGate` instead of inside the event loop:
  the server keeps answering other requests while it predicts, and a request that finds every slot and
  queue place taken gets 503 with ``Retry-After`` (``--conf infer_concurrency`` / ``--conf infer_queue``);
* ``POST /infer/{model}?output=dicom_seg`` (MONAI Label's name for a DICOM SEG answer, which 0.8.5 gives
  only for DICOMweb datastores, converting the NIfTI with its own writer) is passed on as the request
  parameter ``output_format: "dicom-seg"``, so medunet's app answers with the DICOM SEG that ``medunet
  segment --format dicom-seg`` writes (:mod:`medunet.label.dicom_seg`), sent as ``application/dicom``.

Needs monailabel.
"""

from __future__ import annotations

import functools
import logging

from fastapi import HTTPException
from fastapi.routing import APIRoute
from monailabel.app import app as _monailabel_app
from monailabel.config import settings
from monailabel.endpoints import infer as _infer_endpoint
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, JSONResponse

from medunet.label.dicom_seg import with_dicom_seg
from medunet.label.gate import RETRY_AFTER_S, Busy, InferGate, gate_from_conf
from medunet.label.safety import check_request

__all__ = ["app", "RejectPathIds", "gate_infer_route", "infer_gate"]

logger = logging.getLogger(__name__)


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


def gate_infer_route(router, gate: InferGate, path: str = "/infer/{model}") -> None:
    """Replace the ``POST path`` route of ``router`` (MONAI Label's infer router) by one that runs
    MONAI Label's ``run_inference`` in a worker thread once ``gate`` admits it (503 when it does not).

    The new route keeps the original's parameters (its signature is the original endpoint's), name,
    summary and OpenAPI schema. The router must not have been included in the app yet, or be included
    lazily (FastAPI 0.16x re-reads an included router's routes when they change).

    Raises:
        RuntimeError: the router has no such route (another monailabel version).
    """
    index = next((i for i, r in enumerate(router.routes)
                  if isinstance(r, APIRoute) and r.path == path and "POST" in r.methods), None)
    if index is None:
        raise RuntimeError(f"MONAI Label's POST {path} route not found (medunet's label server needs "
                           "monailabel 0.8.x)")
    route = router.routes.pop(index)

    @functools.wraps(route.endpoint)
    async def gated_inference(**kwargs):
        kwargs.pop("user", None)  # checked by the original's RBAC dependency; run_inference has no such argument
        if kwargs.get("output") == _infer_endpoint.ResultType.dicom_seg:
            try:
                kwargs["params"] = with_dicom_seg(kwargs.get("params"))
            except ValueError as e:
                raise HTTPException(status_code=400, detail=str(e)) from None
            kwargs["output"] = _infer_endpoint.ResultType.image  # the answer file is the DICOM SEG
        try:
            async with gate.admit():
                response = await run_in_threadpool(_infer_endpoint.run_inference, **kwargs)
            if isinstance(response, FileResponse) and str(response.path).endswith(".dcm"):
                response.headers["content-type"] = "application/dicom"
            return response
        except Busy as e:
            logger.warning(f"POST {path}: {e}")
            raise HTTPException(status_code=503, detail=str(e),
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    router.add_api_route(route.path[len(router.prefix):], gated_inference, methods=["POST"], name=route.name,
                         summary=route.summary, responses=route.responses, openapi_extra=route.openapi_extra)


infer_gate = gate_from_conf(settings.MONAI_LABEL_APP_CONF)
gate_infer_route(_infer_endpoint.router, infer_gate)
_monailabel_app.add_middleware(RejectPathIds)
app = _monailabel_app
