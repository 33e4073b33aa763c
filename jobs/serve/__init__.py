"""`m3 serve`: the model and the live build of its bank behind an OpenAI-compatible API on Ray
Serve (docs/serving.md)."""
