"""Length buckets: the padded lengths that batches are cut to, so a run compiles a few shapes.

Buckets are powers of two and the midpoints 1.5× between them
(16, 24, 32, 48, 64, 96, 128, 192, ...): at most a third of a padded row is
padding, against a half with powers of two alone, for twice as many shapes.
"""

from __future__ import annotations

MIN_BUCKET = 16  # the shortest padded length; shorter buckets only add compiles


def bucket_length(length: int, max_length: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """The smallest bucket ``≥ length`` (and ``≥ minimum``), capped at ``max_length``."""
    bucket = minimum
    while bucket < length:
        if bucket & (bucket - 1) == 0:  # a power of two: the midpoint comes next
            bucket = max(bucket * 3 // 2, bucket + 1)
        else:  # a midpoint: the next power of two
            bucket = 1 << bucket.bit_length()
    return bucket if max_length is None else min(bucket, max_length)
