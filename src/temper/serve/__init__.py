"""`temper serve`'s HTTP side: an OpenAI-compatible API over the continuous-batching scheduler."""
