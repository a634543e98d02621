"""Cross-cutting gRPC concerns, as grpc.aio server interceptors.

- `MetricsInterceptor`: go-grpc-prometheus style counters and latency histogram.
- `ExceptionMappingInterceptor`: the single place where exceptions become status codes
  (see `errors.status_for`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc import aio

from flywheel.runtime import metrics
from flywheel.runtime.errors import FlywheelError, InvalidArgument, status_for

log = logging.getLogger(__name__)

_RPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def _split_method(full_method: str) -> tuple[str, str]:
    # "/flywheel.v1.RewardService/Score" -> ("flywheel.v1.RewardService", "Score")
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        fn = getattr(handler, attr)
        if fn is not None:
            return fn
    raise ValueError("handler has no behavior")


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
             request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _as_async_iter(result: Any) -> AsyncIterator[Any]:
    """Server-streaming behaviours may be async generators or coroutines that write via context."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result


class _WrappingInterceptor(aio.ServerInterceptor):
    """Wraps each method's behaviour in `around_unary` / `around_stream` (subclasses define them)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        rpc_type = _RPC_TYPES[(handler.request_streaming, handler.response_streaming)]
        inner = _behavior(handler)
        deserializer = self.wrap_deserializer(handler.request_deserializer)

        if handler.response_streaming:

            async def stream_behavior(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in self.around_stream(method, rpc_type, inner, request, context):
                    yield item

            return _rebuild(handler, stream_behavior, deserializer)

        async def unary_behavior(request: Any, context: aio.ServicerContext) -> Any:
            return await self.around_unary(method, rpc_type, inner, request, context)

        return _rebuild(handler, unary_behavior, deserializer)

    def wrap_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return deserializer

    async def around_unary(self, method: str, rpc_type: str, inner: Callable[..., Any], request: Any,
                           context: aio.ServicerContext) -> Any:
        return await inner(request, context)

    async def around_stream(self, method: str, rpc_type: str, inner: Callable[..., Any], request: Any,
                            context: aio.ServicerContext) -> AsyncIterator[Any]:
        async for item in _as_async_iter(inner(request, context)):
            yield item


def _code_name(context: aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        return default.name
    if isinstance(code, grpc.StatusCode):
        return code.name
    # grpc.aio may report the raw integer status.
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def _failure_code(context: aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """The status the client saw when the handler ended with `exc` and set no code itself.

    A handler is cancelled (CancelledError) when the client cancelled or its deadline passed;
    the client then saw CANCELLED or DEADLINE_EXCEEDED, which is what the metric must record
    (UNKNOWN would make an alert on server faults fire on ordinary client timeouts).
    """
    if isinstance(exc, asyncio.CancelledError) or context.cancelled():
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MetricsInterceptor(_WrappingInterceptor):
    """Outermost interceptor: counts and times every RPC, labelled with its final status code."""

    def _labels(self, method: str, rpc_type: str) -> tuple[str, str, str]:
        service, name = _split_method(method)
        return rpc_type, service, name

    async def around_unary(self, method, rpc_type, inner, request, context):  # type: ignore[override]
        labels = self._labels(method, rpc_type)
        metrics.GRPC_STARTED.labels(*labels).inc()
        if rpc_type == "unary":
            metrics.GRPC_MSG_RECEIVED.labels(*labels).inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            response = await inner(request, context)
            metrics.GRPC_MSG_SENT.labels(*labels).inc()
            return response
        except BaseException as exc:
            code = _failure_code(context, exc)
            raise
        finally:
            metrics.GRPC_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            metrics.GRPC_HANDLED.labels(*labels, _code_name(context, code)).inc()

    async def around_stream(self, method, rpc_type, inner, request, context):  # type: ignore[override]
        labels = self._labels(method, rpc_type)
        metrics.GRPC_STARTED.labels(*labels).inc()
        if rpc_type == "server_stream":
            metrics.GRPC_MSG_RECEIVED.labels(*labels).inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            async for item in _as_async_iter(inner(request, context)):
                metrics.GRPC_MSG_SENT.labels(*labels).inc()
                yield item
        except BaseException as exc:
            code = _failure_code(context, exc)
            raise
        finally:
            metrics.GRPC_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            metrics.GRPC_HANDLED.labels(*labels, _code_name(context, code)).inc()


class _Undecodable:
    """Stands in for a request message whose bytes could not be parsed."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgument("request", f"cannot decode message: {request.error}")
        yield request


class ExceptionMappingInterceptor(_WrappingInterceptor):
    """Turns exceptions escaping a handler into statuses: the one mapping for all services.

    Undecodable request bytes are INVALID_ARGUMENT too (gRPC itself would answer UNKNOWN): the
    deserializer is wrapped so the failure reaches the handler wrapper as a value.
    """

    def wrap_deserializer(self, deserializer):  # type: ignore[override]
        if deserializer is None:
            return None

        def safe(data: bytes) -> Any:
            try:
                return deserializer(data)
            except Exception as exc:  # noqa: BLE001 - reported as INVALID_ARGUMENT below
                return _Undecodable(exc)

        return safe

    @staticmethod
    def _check(request: Any) -> Any:
        if isinstance(request, _Undecodable):
            raise InvalidArgument("request", f"cannot decode message: {request.error}")
        if hasattr(request, "__aiter__"):
            return _checked_stream(request)
        return request

    async def _abort(self, method: str, exc: BaseException, context: aio.ServicerContext) -> None:
        code, message = status_for(exc)
        if isinstance(exc, (FlywheelError, NotImplementedError)):
            log.info("%s -> %s: %s", method, code.name, message)
        else:
            log.exception("%s failed", method, exc_info=exc)
        await context.abort(code, message)

    async def around_unary(self, method, rpc_type, inner, request, context):  # type: ignore[override]
        try:
            return await inner(self._check(request), context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await self._abort(method, exc, context)

    async def around_stream(self, method, rpc_type, inner, request, context):  # type: ignore[override]
        try:
            async for item in _as_async_iter(inner(self._check(request), context)):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await self._abort(method, exc, context)
