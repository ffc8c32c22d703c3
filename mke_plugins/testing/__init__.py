"""mke_plugins.testing"""
