"""The gRPC server for HierarchicalTopK SAEs (contract: ``protos/hsae/v1/hsae.proto``).

Modules, in the order a request meets them:

* ``stubs`` / ``build_proto`` - the generated ``hsae_pb2`` modules (``make proto``) and the
  check that they match the proto;
* ``errors`` - the one table from exceptions to gRPC status codes;
* ``convert`` - protobuf <-> tensors (``*_from_pb`` validate, ``*_to_pb`` build);
* ``limits`` - per-request and per-stream limits (``ServingLimits``, the CLI's defaults);
* ``gate`` - admission of work calls: the stream cap and the drain on shutdown;
* ``tokenise`` - request text to token ids, refusing over-long text before tokenising it all;
* ``servicer`` - the thin ``hsae.v1.HSAE`` implementation;
* ``batcher`` - dynamic batching: one LM forward and one SAE encode per batch;
* ``backend`` - what an SAE engine must provide (torch, ONNX Runtime);
* ``server`` - options, TLS / token auth, health, reflection, graceful shutdown.

Nothing heavy is imported here: ``import hsae_runtime.serving.server`` pulls in grpc and torch.
"""
