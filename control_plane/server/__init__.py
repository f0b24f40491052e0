"""The gRPC server: AdminService and WorkerService servicers, error mapping, health, reflection."""
