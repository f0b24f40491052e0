"""The data plane: a resident base model, adapter slots and a continuous-batching engine."""

import openlora  # noqa: F401  (first: it sets how gRPC handles fork before grpc is imported)
