"""The `grpc.health.v1` messages, built in a private descriptor pool so the client needs no extra package."""

from __future__ import annotations

from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"


@lru_cache(maxsize=1)
def health_messages():
    """(HealthCheckRequest, HealthCheckResponse, status names) as in grpc's health.proto.

    A private pool: the server side imports grpcio-health-checking's copy into the default pool, and
    two registrations of one file there would clash.
    """
    proto = descriptor_pb2.FileDescriptorProto(name="latentd_client_health.proto", package="grpc.health.v1",
                                               syntax="proto3")
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
    response_type = pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    names = {value.number: value.name for value in response_type.enum_types_by_name["ServingStatus"].values}
    return request_class, message_factory.GetMessageClass(response_type), names
