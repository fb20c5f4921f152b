"""The error interceptor: wraps each method's handler once, and maps what the handler raises to a status."""

from __future__ import annotations

import asyncio

import grpc

from latentd.server.interceptors import ErrorInterceptor
from latentd.vae.errors import InvalidInputError


class _Details:
    def __init__(self, method: str) -> None:
        self.method, self.invocation_metadata = method, ()


class _Context:
    aborted: tuple | None = None

    async def abort(self, code, message):
        self.aborted = (code, message)
        raise grpc.aio.AbortError()


async def _refuse(request, context):
    raise InvalidInputError("images[0]: empty image", field="images[0]")


def test_each_method_is_wrapped_once_and_errors_become_statuses():
    interceptor = ErrorInterceptor()
    handler = grpc.unary_unary_rpc_method_handler(_refuse)
    other = grpc.unary_unary_rpc_method_handler(_refuse)

    async def intercept(method, returned):
        async def continuation(details):
            return returned
        return await interceptor.intercept_service(continuation, _Details(method))

    async def scenario():
        first = await intercept("/latentd.v1.Latentd/Encode", handler)
        assert await intercept("/latentd.v1.Latentd/Encode", handler) is first
        assert await intercept("/latentd.v1.Latentd/Encode", other) is not first  # a new handler is rewrapped
        assert await intercept("/unknown", None) is None
        context = _Context()
        try:
            await first.unary_unary(object(), context)
        except grpc.aio.AbortError:
            pass
        return context.aborted

    code, message = asyncio.run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "images[0]" in message
