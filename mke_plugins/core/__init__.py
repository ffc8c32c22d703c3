"""mke_plugins.core"""
