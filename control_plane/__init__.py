"""The control plane: registry, tenants and keys, artifacts, usage and billing in Postgres."""

import openlora  # noqa: F401  (first: it sets how gRPC handles fork before grpc is imported)
