"""MetaService's contract under bad input: GetServerInfo answers for a real key and refuses any
other.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given

from runplane.v1 import meta_service_pb2
from tests.helpers.contract import (
    FUZZ,
    OK,
    Stack,
    assert_proper,
    unary,
)
from tests.helpers.inputs import (
    auths,
)

pytestmark = pytest.mark.timeout(300)


# -- MetaService.GetServerInfo ---------------------------------------------------------------------


@given(who=auths)
@FUZZ
def test_get_server_info_answers_properly(stack: Stack, who: str) -> None:
    outcome = unary(
        stack.channel(),
        "/runplane.v1.MetaService/GetServerInfo",
        meta_service_pb2.GetServerInfoRequest(),
        stack.auth(who),
        meta_service_pb2.GetServerInfoResponse,
    )
    assert_proper(outcome, f"GetServerInfo as {who!r}")
    if who in ("dev", "prod"):
        assert outcome.code is OK, str(outcome)
        assert outcome.responses[0].environment == who
    else:
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, str(outcome)
