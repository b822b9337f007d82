"""The gRPC server for HierarchicalTopK SAEs (contract: ``protos/hsae/v1/hsae.proto``).

Modules, in the order a request meets them:

* ``stubs`` / ``build_proto`` - the generated ``hsae_pb2`` modules (``make proto``) and the
  check that they match the proto;
* ``errors`` - the one table from exceptions to gRPC status codes and HTTP statuses;
* ``convert`` - protobuf <-> tensors (``*_from_pb`` validate, ``*_to_pb`` build);
* ``limits`` - every serve default: ``ServingLimits``, ``BatcherConfig``, address, grace;
* ``gate`` - admission of work calls: the stream cap and the drain on shutdown;
* ``tokenise`` - request text to token ids, refusing over-long text before tokenising it all;
* ``servicer`` - the thin ``hsae.v1.HSAE`` implementation;
* ``jobs`` - the work queued for the batcher (encode, decode) and its results, protobuf-free;
* ``batcher`` - the one worker that runs every model call: one LM forward and one SAE encode
  per batch, long jobs in chunks (``chunks``);
* ``backend`` - the SAE engine protocol and its torch and ONNX Runtime implementations;
* ``security`` - TLS credentials and the bearer-token interceptor;
* ``server`` - options, health, reflection, graceful shutdown.
* ``generate`` - Generate: request parsing and the generation turns the batch worker takes;
* ``http`` / ``http_models`` - the HTTP/JSON API over the same servicer (``--http-port``);
* ``metrics`` - Prometheus metrics (``--metrics-port``).

Nothing heavy is imported here: ``import hsae_runtime.serving.server`` pulls in grpc and torch.
"""
