"""The local stack without Docker: Kafka (KRaft) and a durable Valkey primary + replica.

``Stack`` is the API used by ``pulse up|down|status``, tests, the demo and benchmarks.
"""

from pipeline.stack.errors import PortInUseError, PrerequisiteError, StackError, StartupError
from pipeline.stack.kafka import KafkaService
from pipeline.stack.service import Service, ServiceStatus
from pipeline.stack.stack import Stack
from pipeline.stack.valkey import ValkeyService

__all__ = [
    "KafkaService",
    "PortInUseError",
    "PrerequisiteError",
    "Service",
    "ServiceStatus",
    "Stack",
    "StackError",
    "StartupError",
    "ValkeyService",
]
