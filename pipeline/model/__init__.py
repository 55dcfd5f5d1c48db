"""Training side: predefined-sparse layers, the split model, its config, data, training,
calibration and the artifacts the edge and the server load."""
