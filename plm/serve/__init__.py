"""`plm serve`: an OpenAI-compatible HTTP server with continuous batching.

Layers inside the package, lowest first:
  backend   per-sequence decoding over a runtime (admit/prefill, one batched step, free):
            `TorchBackend` on the edge runtime or the reference model, `NativeBackend` on
            plm.infer.native_decoder
  scheduler the one thread that owns the model: queue, chunked prefill, batched decode,
            sampling, stop handling, text streaming, cancellation, draining
  metrics   counters, gauges and histograms in Prometheus text
  protocol  OpenAI request parsing and response / error shapes
  app       the Starlette application (routes, auth, SSE)
  server    loading the model and running uvicorn (SIGTERM drains)
"""
