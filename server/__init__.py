"""The online ranking service: gRPC (``avrec.v1.RankingService``) over Redis features and ONNX.

Nothing here imports torch or transformers: the service runs on onnxruntime, grpcio, redis,
polars and feast alone.
"""
