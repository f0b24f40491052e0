"""The data-plane worker: InferenceService over gRPC, joining the engine and the control plane."""
