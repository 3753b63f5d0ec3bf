"""`kiln-engine build`: checkpoint -> verified, sharded, optionally quantized artifact with a manifest.

Modules: `source` (URIs: paths, pvc://, hf://, s3://), `progress` (KILN_PROGRESS lines; no torch),
`manifest` (manifest.json, checksums, verification; no torch), `pipeline` (the torch build and its
pure decisions), `convert` (casting, quantizing and sharding tensors), `capacity` (tokens/s and
concurrency within the TTFT target), `result` (the --result-file JSON), `trt` (TensorRT-LLM build).
"""
