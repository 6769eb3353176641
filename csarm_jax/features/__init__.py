"""Features of images as data: TVN of embeddings (``tvn``), fitted on a store's controls
(``store_tvn``)."""
