"""avrec: a feature-store-centred recommender for audio and video content."""

__version__ = "0.1.0"
