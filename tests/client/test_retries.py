"""Which failures the SDK retries: only "try again later" ones; a request that cannot succeed is sent once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from latentd.client import AsyncLatentClient, LatentClient, RetryPolicy
from latentd.client.errors import CALLER_ERRORS, RETRYABLE, LatentdClientError

POLICY = RetryPolicy(attempts=4, initial=0.0, maximum=0.0)
FAILURES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"refused with {self._code.name}"


class _Method:
    """A stub method that always fails with `code`, counting its calls."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code, self.calls = code, 0

    def __call__(self, request, timeout=None, metadata=None):
        self.calls += 1
        raise _Failed(self.code)


class _AsyncMethod(_Method):
    async def __call__(self, request, timeout=None, metadata=None):
        return super().__call__(request, timeout, metadata)


def test_the_request_at_fault_is_never_a_reason_to_retry():
    assert not RETRYABLE & CALLER_ERRORS
    assert CALLER_ERRORS >= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                             grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
                             grpc.StatusCode.UNAUTHENTICATED}


@pytest.mark.parametrize("code", FAILURES, ids=lambda code: code.name)
def test_the_sync_client_retries_only_retryable_codes(code):
    method = _Method(code)
    with LatentClient("127.0.0.1:1", retries=POLICY, timeout=30) as client:
        with pytest.raises(LatentdClientError) as raised:
            client._unary(method, object(), None)
    assert raised.value.code == code
    assert method.calls == (POLICY.attempts if code in RETRYABLE else 1)


@pytest.mark.parametrize("code", FAILURES, ids=lambda code: code.name)
def test_the_async_client_retries_only_retryable_codes(code):
    method = _AsyncMethod(code)

    async def call():
        async with AsyncLatentClient("127.0.0.1:1", retries=POLICY, timeout=30) as client:
            await client._unary(method, object(), None)

    with pytest.raises(LatentdClientError) as raised:
        asyncio.run(call())
    assert raised.value.code == code
    assert method.calls == (POLICY.attempts if code in RETRYABLE else 1)
