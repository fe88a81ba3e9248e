"""Data: record sources (paired, conversation, VQA) and the grain batch pipeline.

``records`` (the source protocol, `DataError`, bad-record summaries), one module per format
(``paired``, ``llava``, ``coco``, ``vqa``, ``tfds_source``, ``easy_vqa``, ``photos``),
``registry.open_source`` (a source from one spec string) and ``pipeline.Loader`` (seeded,
sharded, padded, resumable batches).
"""
