"""What a saved model directory holds (model/checkpoint.py writes and reads it). Apart from the
checkpoint code, so that what only looks for a model (jobs/models.py, the CLI) imports no torch."""

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
