"""`hotpath.evaluation.Evaluation`: late labels attached to logged predictions over gRPC, on the inference port."""

from __future__ import annotations

import grpc

from hotpath._proto import evaluation_pb2
from hotpath.errors import InferenceError, InvalidArgument
from hotpath.evaluation.log import EvaluationLogs
from hotpath.evaluation.store import LabelValue
from hotpath.transport._frontend import ServerCall
from hotpath.transport.frontend import FrontEnd

SERVICE = evaluation_pb2.DESCRIPTOR.services_by_name["Evaluation"].full_name
OK = grpc.StatusCode.OK.value[0]


def label_value(label: evaluation_pb2.Label) -> LabelValue:
    """The ground truth a Label carries; raises InvalidArgument when it carries none."""
    which = label.WhichOneof("value")
    if which is None:
        raise InvalidArgument(f"label for id '{label.id}' row {label.row} has no value; set int_value, number_value, "
                              "string_value or bool_value")
    return getattr(label, which)


class EvaluationService:
    """Serves AttachLabels over the server's prediction logs."""

    def __init__(self, logs: EvaluationLogs) -> None:
        self.logs = logs

    def register(self, frontend: FrontEnd) -> None:
        """Serve every RPC of the service on `frontend`."""
        frontend.add_unary(f"/{SERVICE}/AttachLabels", evaluation_pb2.AttachLabelsRequest, self.attach_labels)

    async def attach_labels(self, request: evaluation_pb2.AttachLabelsRequest, call: ServerCall) -> None:
        try:
            labels = [(label.id, label.row, label_value(label)) for label in request.labels]
            unknown = await self.logs.attach(request.model_name, labels)
        except InferenceError as exc:
            call.finish(exc.code.value[0], exc.message)
            return
        response = evaluation_pb2.AttachLabelsResponse(attached=len(labels) - len(unknown), unknown=len(unknown),
                                                       unknown_ids=[request_id for request_id, _ in unknown])
        call.finish(OK, "", response.SerializeToString())
