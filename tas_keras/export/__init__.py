"""Export to SavedModel and .tflite, verified with LiteRT (`exporter.export_and_verify`), and the LiteRT
latency tables of the latency cost (`layer_latency`)."""
