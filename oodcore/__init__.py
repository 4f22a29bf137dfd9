"""oodcore: extract once, score many.

One pass per (architecture, dataset) caches logits and penultimate features;
every post-hoc OOD detector is then a cheap function of that cache.
Convention everywhere: OOD is the positive class and a higher score means more OOD.
"""

__version__ = "0.2.0"
