"""The policy service: batched sampling with behaviour logprobs, hot reload, Kafka rollout worker.

Read top to bottom: `settings` -> `sampling` (parameter validation) -> `engine` (the in-process
generation engine, reusable by the trainer and the demo loop) -> `batching` (async request
batching, queue bound, deadlines, streaming) -> `backends` (local engine or a remote TGI server)
-> `service` (gRPC) / `http_api` (TGI-compatible HTTP) / `worker` (Kafka prompts -> rollouts) /
`reload` (model-version hot reload) -> `app` (wiring).
"""
