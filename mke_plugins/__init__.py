"""mke-plugins: multimodal knowledge-editing methods for EasyEdit, delivered as pluggy plugins."""

__version__ = "0.1.0"
