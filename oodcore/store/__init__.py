"""Everything on disk: atomic writes, the cache layout and keys, run data, thumbnails."""
