"""splitexit's shared core and edge side: sparse layers, the split model, training and
calibration, data, artifacts and the command line."""
