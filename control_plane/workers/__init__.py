"""Workers (data-plane processes) and the base models they serve."""
